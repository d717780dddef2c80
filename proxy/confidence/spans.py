"""Scores for each part of an answer, from the tokens that make up that part.

For sentence-level verdicts each :class:`~proxy.sentences.Segment` is scored on its own
tokens: :func:`token_offsets` finds where each token starts in the answer, and
:func:`segment_scores` gives every segment the usual logprob scores
(:func:`~proxy.confidence.logprobs.scores_from_tokens`) over its tokens.

Which tokens: all of the segment's (white space aside). Reading only the tokens that
carry the claim ("Lima" in "Its capital is Lima.", with the prompt's words, function
words and punctuation *given*) sounds better and measured worse: on held-out multi-fact
answers of the reference model, claim-level AUROC 0.787 against 0.895 for all tokens,
ECE 0.063 against 0.037 (docs/calibration.md, "Sentences"). The doubt often sits in
the words that rule drops ("It is in *the* Caribbean"), and given words make the scores
of sentences of one kind mix two scales. ``context`` keeps that rule available, for the
comparison only: the proxy scores every token, and its sentence calibration is fitted so.

Pure: standard library only.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from proxy.confidence.logprobs import scores_from_tokens
from proxy.confidence.shift_scores import FUNCTION_WORDS
from proxy.sentences import Segment

_WORD = re.compile(r"\w+")
#: The prompt text read for given words: its end, where the question is. A bound, so a
#: multi-megabyte prompt costs no more than this to read.
_MAX_CONTEXT_CHARS = 65_536
#: How far ahead a token that does not match the text where expected is looked for
#: (a server may spell a byte-fallback token differently from the text).
_RESYNC_WINDOW = 16


def context_words(texts: Sequence[str]) -> frozenset[str]:
    """The lower-cased words of the prompt's texts (the last ``_MAX_CONTEXT_CHARS``)."""
    joined = "\n".join(texts)[-_MAX_CONTEXT_CHARS:]
    return frozenset(w.lower() for w in _WORD.findall(joined))


def token_offsets(tokens: Sequence[str], text: str) -> list[int] | None:
    """Where each token starts in ``text``; None when the tokens do not spell the text.

    Tokens are matched in order; one that does not match where expected is looked for a
    few characters ahead. When fewer than nine tokens in ten match, the alignment is
    refused rather than guessed: a sentence must not be judged on another's tokens.
    """
    return Alignment().extend(tokens, text)


@dataclass(slots=True)
class Alignment:
    """:func:`token_offsets` for a text that grows at its end (a stream), each token
    placed once: placing every token again at every sentence made a long stream
    quadratic."""

    offsets: list[int] = field(default_factory=list)
    pos: int = 0
    matched: int = 0
    nonempty: int = 0

    def extend(self, tokens: Sequence[str], text: str) -> list[int] | None:
        """Place the tokens not placed yet (``tokens``: all of them so far, ``text``: the
        text so far); every offset, or None while fewer than nine in ten matched."""
        return self.add(tokens[len(self.offsets) :], text)

    def add(self, new: Sequence[str], text: str) -> list[int] | None:
        """Place ``new``, the tokens that follow those placed; as :meth:`extend`."""
        pos, matched, nonempty = self.pos, self.matched, self.nonempty
        for token in new:
            if token:
                nonempty += 1
                if text.startswith(token, pos):
                    matched += 1
                else:
                    found = text.find(token, pos, pos + _RESYNC_WINDOW + len(token))
                    if found >= 0:
                        pos = found
                        matched += 1
            self.offsets.append(pos)
            pos = min(len(text), pos + len(token))
        self.pos, self.matched, self.nonempty = pos, matched, nonempty
        if nonempty and matched < 0.9 * nonempty:
            return None
        return self.offsets


def _given(token: str, start: int, text: str, context: Collection[str]) -> bool:
    """A token with no word character, or part of a word the prompt already holds."""
    inner = _WORD.search(token)
    if inner is None:
        return True
    at = start + inner.start()
    # The whole word this token is part of ("L" + "ima" are both part of "Lima").
    left = at
    while left > 0 and (text[left - 1].isalnum() or text[left - 1] == "_"):
        left -= 1
    word = _WORD.match(text, left)
    if word is None:
        return True
    lower = word.group().lower()
    return lower in FUNCTION_WORDS or lower in context


def segment_scores(
    segments: Sequence[Segment],
    text: str,
    tokens: Sequence[str],
    lps: Sequence[float],
    tops: Sequence[Sequence[float]],
    context: Collection[str] | None = None,
    offsets: Sequence[int] | None = None,
) -> list[dict[str, float]] | None:
    """The logprob scores of each segment (empty for a segment no token falls in), or
    None when the tokens cannot be placed in the text (:func:`token_offsets`).

    A token belongs to the segment its first non-space character falls in (" Lima"
    starts at the space, but is part of the sentence "Lima" is in); tokens in the white
    space between segments, or past the text, belong to none. ``tops`` is used only when
    every token has its top-k list (otherwise which list is whose is unknown).
    ``context``: score only the tokens not given by these words (see above); None, as
    the proxy does: every token. ``offsets``: the tokens' offsets when already placed
    (an :class:`Alignment`); the tokens may then be any run of the answer's tokens.
    """
    if offsets is None:
        offsets = token_offsets(tokens, text)
    if offsets is None or len(offsets) != len(lps):
        return None
    starts = [s.start for s in segments]
    with_tops = len(tops) == len(lps)
    picked: list[tuple[list[float], list[Sequence[float]], list[float], list[Sequence[float]]]]
    picked = [([], [], [], []) for _ in segments]
    for i, (token, offset) in enumerate(zip(tokens, offsets, strict=True)):
        lead = len(token) - len(token.lstrip())
        at = offset + lead
        k = bisect_right(starts, at) - 1
        if k < 0 or at >= segments[k].end or not token.strip():
            continue
        all_lps, all_tops, fact_lps, fact_tops = picked[k]
        all_lps.append(lps[i])
        if with_tops:
            all_tops.append(tops[i])
        if context is not None and not _given(token, offset, text, context):
            fact_lps.append(lps[i])
            if with_tops:
                fact_tops.append(tops[i])
    out = []
    for all_lps, all_tops, fact_lps, fact_tops in picked:
        if fact_lps:
            out.append(scores_from_tokens(fact_lps, fact_tops))
        else:
            out.append(scores_from_tokens(all_lps, all_tops))
    return out
