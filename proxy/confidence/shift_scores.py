"""Confidence inputs read from the answer's words, for the errors that survive a shift.

Two shapes of confident error that the plain logprob scores read as certainty (issue
12): an answer that repeats the question's own words ("What is the capital of Tokelau?"
→ "Tokelau"), which a model copies from its context with high probability whether or
not it is right; and a number whose first tokens are nearly free (a leading space, then
"1", "9" for any year), so that ``first_logprob`` reads the format, not the answer.
Two inputs, computed from the answer's token texts and logprobs and the question
(:mod:`proxy.confidence.question`):

* ``question_overlap``: the share of the answer's words that the question already holds
  (function words such as "of" and "the" are not counted: sharing them copies nothing).
  0 when nothing is copied, 1 when every word is. Not a confidence: an input of the
  logistic calibration only, like ``log_length``.
* ``answer_min_logprob``: the least likely token among those that carry the answer (a
  letter or digit outside a function word: the leading space and punctuation of a number
  do not) and are not copied from the question: how sure the model is of what it adds.

A third, the logprob of the first token that carries the answer, was measured and
dropped: on no set did it add anything to the shipped inputs (docs/calibration.md,
"Traffic that differs").

Words are compared after folding case and accents; a number keeps its decimal point and
drops thousands separators ("1,000" = "1000"). A token belongs to every word it overlaps
in the answer's text, so "Tok" + "el" + "au" are all copies of "Tokelau".

When no token qualifies (an answer of punctuation, or copied whole), ``answer_min_logprob``
falls back to the carrying tokens, then to the tokens that have text, then to all, so
that every scored answer has it: a calibration reading it never loses an answer, and
``question_overlap`` tells it the answer was a copy. Without a question (None) neither
input is given: a calibration reading them then has no P(correct) for the answer.

Pure: standard library only.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.confidence.logprobs import token_logprobs, token_texts

#: Words that say nothing about which answer was given: sharing them copies nothing.
FUNCTION_WORDS = frozenset(
    {
        "a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "is", "are", "was",
        "were", "be", "for", "by", "from", "with", "as", "it", "its", "this", "that",
    }
)  # fmt: skip
#: A number (digits with inner "." or "," separators) or a run of letters, after folding.
_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")


@dataclass(frozen=True, slots=True)
class Word:
    """One word of a text: where it is, and its folded form."""

    start: int
    end: int
    value: str


def _fold_char(c: str) -> str:
    # One character in, one out, so that word offsets stay those of the original text.
    base = [x for x in unicodedata.normalize("NFKD", c) if not unicodedata.combining(x)]
    lower = (base[0] if base else c).lower()
    return lower[0] if lower else c


def _fold(text: str) -> str:
    if text.isascii():
        return text.lower()  # nearly every answer: no decomposition needed
    return "".join(_fold_char(c) for c in text)


def words(text: str) -> list[Word]:
    """The words of ``text`` with their offsets, folded (case, accents, "1,000" = "1000")."""
    return [
        Word(m.start(), m.end(), m.group().replace(",", "")) for m in _WORD.finditer(_fold(text))
    ]


def question_words(question: str) -> frozenset[str]:
    """The folded words of a question, to compare an answer's words with."""
    return frozenset(w.value for w in words(question))


def question_overlap(answer: str, asked: frozenset[str]) -> float:
    """The share of the answer's (non-function) words that the question holds; 0 if none."""
    said = [w.value for w in words(answer) if w.value not in FUNCTION_WORDS]
    if not said:
        return 0.0
    return sum(1 for w in said if w in asked) / len(said)


def token_roles(texts: Sequence[str], asked: frozenset[str]) -> list[tuple[bool, bool]]:
    """Per token: (carries the answer, copied from the question ``asked``)."""
    found = [w for w in words("".join(texts)) if w.value not in FUNCTION_WORDS]
    roles = []
    pos = i = 0
    for text in texts:
        start, end = pos, pos + len(text)
        pos = end
        while i < len(found) and found[i].end <= start:
            i += 1  # words wholly before this token
        inside = []
        j = i
        while j < len(found) and found[j].start < end:
            inside.append(found[j].value)
            j += 1
        carries = bool(inside) and end > start
        roles.append((carries, carries and all(v in asked for v in inside)))
    return roles


def text_scores(
    texts: Sequence[str], lps: Sequence[float], asked: frozenset[str] | None
) -> dict[str, float]:
    """The inputs of one answer (see the module docstring); empty without tokens.

    ``texts`` and ``lps`` are the answer's scored tokens, aligned; ``asked`` the
    question's words (:func:`question_words`), or None when the request has no question:
    then nothing is given.
    """
    if asked is None or not lps or len(texts) != len(lps):
        return {}
    roles = token_roles(texts, asked)
    carrying = [lp for lp, (carries, _) in zip(lps, roles, strict=True) if carries]
    added = [lp for lp, (carries, copied) in zip(lps, roles, strict=True) if carries and not copied]
    # Fallbacks for an answer that adds nothing: its carrying tokens; without any, its
    # tokens that have text (a stream's stop tokens come as empty text, and a complete
    # answer has none), then all.
    with_text = [lp for lp, t in zip(lps, texts, strict=True) if t] or list(lps)
    return {
        "answer_min_logprob": min(added or carrying or with_text),
        "question_overlap": question_overlap("".join(texts), asked),
    }


def text_scores_of_choice(
    choice_logprobs: Mapping[str, Any] | None, question: str | None
) -> dict[str, float]:
    """The inputs from a choice's ``logprobs`` field (either wire shape), for
    answers read back offline (the evaluation's cached answers); empty when the field
    has no token texts. Raises :class:`~proxy.confidence.logprobs.MalformedLogprobs`
    like :func:`~proxy.confidence.logprobs.token_logprobs`."""
    lps, _ = token_logprobs(choice_logprobs)
    texts = token_texts(choice_logprobs)
    if texts is None:
        return {}
    return text_scores(texts, lps, None if question is None else question_words(question))
