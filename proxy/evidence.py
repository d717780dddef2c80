"""What the judge is shown: per-choice evidence, gathered whole or from stream chunks.

Every way of answering (a complete response, a buffered stream, a passthrough stream, the
sampled methods) only gathers evidence; :func:`proxy.judge.judge_call` turns it into
verdicts without knowing which one gathered it.

* :func:`from_response` reads a complete OpenAI response;
* :class:`StreamEvidence` collects the same from stream chunks as they pass;
* :meth:`CallEvidence.add_samples` attaches the extra samples, for consistency/hybrid.

Pure of the web framework: it reads the wire format through :mod:`proxy.protocol`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.confidence.consistency import Agreement
from proxy.confidence.logprobs import (
    MalformedLogprobs,
    scores_from_tokens,
    token_logprobs,
    token_texts,
)
from proxy.confidence.shift_scores import question_words, text_scores
from proxy.errors import UpstreamMalformed
from proxy.protocol import Kind, choice_text, choices_of, is_tool_call
from proxy.sampling.draw import SamplingResult


@dataclass(frozen=True, slots=True)
class Tokens:
    """One answer's scored tokens: their texts, logprobs and top-k lists, aligned.

    Kept only for rules judged sentence by sentence, which score each sentence on its
    own tokens; ``tops`` holds one list per token, or none when a token had none.
    """

    texts: list[str]
    lps: list[float]
    tops: list[list[float]]


@dataclass(slots=True)
class ChoiceEvidence:
    """What is known about one choice when it is judged."""

    index: int
    #: the answer's text (None for a tool call or empty content)
    text: str | None
    #: the logprob scores of its tokens (empty when the upstream gave no logprobs)
    scores: Mapping[str, float]
    tool_call: bool = False
    #: how the extra samples agree with this answer (consistency and hybrid only)
    agreement: Agreement | None = None
    #: the scored tokens, for sentence granularity (None: not kept, or no token texts)
    tokens: Tokens | None = None


@dataclass(slots=True)
class CallEvidence:
    """The evidence for every choice of one call, and what the call as a whole says."""

    choices: list[ChoiceEvidence]
    #: the client asked for JSON output (``response_format``)
    json_mode: bool = False
    #: the text already reached the client (passthrough): a verdict can only annotate
    already_sent: bool = False
    #: the extra samples, when the rule's method draws them
    sampling: SamplingResult | None = None

    @property
    def texts(self) -> list[str | None]:
        return [c.text for c in self.choices]

    def add_samples(self, result: SamplingResult, agreements: Iterable[Agreement | None]) -> None:
        """Attach the samples and each choice's agreement with them."""
        self.sampling = result
        for choice, agreement in zip(self.choices, agreements, strict=True):
            choice.agreement = agreement

    def add_text_scores(self, question: str | None) -> None:
        """Add the scores read from each choice's token texts and the question (issue
        12.4, :mod:`proxy.confidence.shift_scores`); needs the tokens kept."""
        asked = None if question is None else question_words(question)
        for choice in self.choices:
            if choice.tokens is not None:
                extra = text_scores(choice.tokens.texts, choice.tokens.lps, asked)
                choice.scores = {**choice.scores, **extra}


def _tokens(logprobs: Any) -> tuple[list[float], list[list[float]]]:
    try:
        return token_logprobs(logprobs)
    except MalformedLogprobs as exc:
        raise UpstreamMalformed(f"The upstream answer has malformed logprobs: {exc}.") from None


def _check_shape(kind: Kind, choice: dict[str, Any], part: str) -> None:
    """A chat choice's ``message`` (or a chunk's ``delta``) must be an object."""
    if kind == "chat" and not isinstance(choice.get(part) or {}, dict):
        raise UpstreamMalformed(f"The upstream answer's '{part}' is not an object.")


def _kept_tokens(logprobs: Any, lps: list[float], tops: list[list[float]]) -> Tokens | None:
    texts = token_texts(logprobs)
    if texts is None or len(texts) != len(lps):
        return None
    return Tokens(texts, lps, tops if len(tops) == len(lps) else [])


def from_response(
    kind: Kind, response: dict[str, Any], *, json_mode: bool, keep_tokens: bool = False
) -> CallEvidence:
    """The evidence in a complete (non-streamed) response; 502 when it is malformed.

    ``keep_tokens``: also keep each choice's token texts (sentence granularity).
    """
    choices = []
    for i, choice in enumerate(choices_of(response)):
        _check_shape(kind, choice, "message")
        logprobs = choice.get("logprobs")
        lps, tops = _tokens(logprobs)
        choices.append(
            ChoiceEvidence(
                index=i,
                text=choice_text(kind, choice),
                scores=scores_from_tokens(lps, tops),
                tool_call=is_tool_call(kind, choice),
                tokens=_kept_tokens(logprobs, lps, tops) if keep_tokens else None,
            )
        )
    return CallEvidence(choices, json_mode=json_mode)


#: A client may ask for n ≤ 128 choices; an index past that is not a choice of this call.
_MAX_CHOICES = 128


@dataclass(slots=True)
class StreamEvidence:
    """Token logprobs, tool-call flags and (when asked) texts per choice index, from chunks."""

    kind: Kind
    keep_texts: bool = False
    #: keep token texts too (sentence granularity); implies keep_texts
    keep_tokens: bool = False
    _lps: dict[int, list[float]] = field(default_factory=dict)
    _tops: dict[int, list[list[float]]] = field(default_factory=dict)
    _tools: set[int] = field(default_factory=set)
    _texts: dict[int, list[str]] = field(default_factory=dict)
    #: token texts per index; None once a chunk's logprobs came without them
    _token_texts: dict[int, list[str] | None] = field(default_factory=dict)
    #: scored tokens with empty text at the end of each choice so far, and how many of
    #: them carried a top-k list (see :meth:`evidence`)
    _empty_tail: dict[int, tuple[int, int]] = field(default_factory=dict)
    _stopped: set[int] = field(default_factory=set)

    def add(self, choice: dict[str, Any]) -> None:
        """Read one streamed choice delta; 502 when it is malformed."""
        index = choice.get("index", 0)
        if type(index) is not int or not 0 <= index < _MAX_CHOICES:
            raise UpstreamMalformed("The upstream stream carried a choice without a valid index.")
        _check_shape(self.kind, choice, "delta")
        if self.keep_texts or self.keep_tokens:
            piece = (
                choice.get("text")
                if self.kind == "completions"
                else (choice.get("delta") or {}).get("content")
            )
            if isinstance(piece, str):
                self._texts.setdefault(index, []).append(piece)
        logprobs = choice.get("logprobs")
        lps, tops = _tokens(logprobs)
        if self.keep_tokens:
            self._add_token_texts(index, logprobs, len(lps))
        self._lps.setdefault(index, []).extend(lps)
        self._tops.setdefault(index, []).extend(tops)
        if lps and isinstance(logprobs, dict):
            self._track_empty_tail(index, logprobs.get("content"))
        if choice.get("finish_reason") == "stop":
            self._stopped.add(index)
        if is_tool_call(self.kind, choice):
            self._tools.add(index)

    def _add_token_texts(self, index: int, logprobs: Any, count: int) -> None:
        kept = self._token_texts.setdefault(index, [])
        if kept is None:
            return
        texts = token_texts(logprobs)
        if texts is None or len(texts) != count:
            self._token_texts[index] = None
        else:
            kept.extend(texts)

    def text(self, index: int) -> str:
        """The text streamed so far for one choice (with ``keep_texts`` or ``keep_tokens``)."""
        return "".join(self._texts.get(index, []))

    def tokens(self, index: int) -> Tokens | None:
        """The scored tokens streamed so far for one choice (``keep_tokens``): a copy."""
        live = self.live_tokens(index)
        if live is None:
            return None
        return Tokens(list(live.texts), list(live.lps), list(live.tops))

    def live_tokens(self, index: int) -> Tokens | None:
        """The same, over the lists the stream keeps appending to: read them at once and
        never keep them (a copy per sentence of a long answer made it quadratic)."""
        texts = self._token_texts.get(index)
        lps, tops = self._lps.get(index, []), self._tops.get(index, [])
        if texts is None or len(texts) != len(lps):
            return None
        return Tokens(texts, lps, tops if len(tops) == len(lps) else [])

    def _track_empty_tail(self, index: int, content: Any) -> None:
        if not isinstance(content, list):
            return
        empty, with_top = self._empty_tail.get(index, (0, 0))
        for token in content:  # shapes already checked by _tokens
            if token.get("logprob") is None:
                continue
            if token.get("token") == "":
                empty, with_top = empty + 1, with_top + bool(token.get("top_logprobs"))
            else:
                empty, with_top = 0, 0
        self._empty_tail[index] = (empty, with_top)

    def _scores(self, index: int) -> Mapping[str, float]:
        lps, tops = self._lps.get(index, []), self._tops.get(index, [])
        empty, with_top = self._empty_tail.get(index, (0, 0))
        if empty and index in self._stopped and empty < len(lps):
            # A server that streams the stop string's tokens (llama-server sends them as
            # empty text) scores them; its complete answers leave them out. Dropped here
            # so that a streamed answer scores as the same answer not streamed: the
            # calibration was fitted on the latter.
            lps = lps[:-empty]
            tops = tops[: len(tops) - with_top]
        return scores_from_tokens(lps, tops)

    def evidence(self, *, json_mode: bool) -> CallEvidence:
        """Everything streamed so far, one choice per index seen, in index order."""
        indexes = sorted(self._lps.keys() | self._tools)
        return CallEvidence(
            [
                ChoiceEvidence(
                    index=i,
                    text=self.text(i) if self.keep_texts or self.keep_tokens else None,
                    scores=self._scores(i),
                    tool_call=i in self._tools,
                    tokens=self.tokens(i) if self.keep_tokens else None,
                )
                for i in indexes
            ],
            json_mode=json_mode,
            already_sent=True,
        )
