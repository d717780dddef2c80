"""The feedback memory: what ``POST /v1/feedback`` needs to know about past responses.

:class:`FeedbackMemory` is the interface; :class:`InMemoryFeedbackMemory` the default
(bounded, per process), :class:`proxy.shared_state.redis_memory.RedisFeedbackMemory`
the shared one (a TTL per response, idempotent across pods).
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from proxy.errors import ProxyError

#: Per choice judged by sentence: (confidence, shipped P) of each part, in order.
SentenceParts = tuple[tuple[float | None, float | None], ...]

#: Parts of one choice remembered for feedback. The memory holds up to
#: ``ABSTAIN_FEEDBACK_MEMORY`` responses, and an upstream may answer with thousands of
#: "sentences": without a cap one response could hold megabytes. 64 parts, packed as
#: doubles, are at most 1 KiB a choice.
MAX_SENTENCES = 64


def pack(parts: SentenceParts) -> array[float]:
    """The first :data:`MAX_SENTENCES` parts as one array of doubles (None as NaN)."""
    return array(
        "d", [math.nan if v is None else v for pair in parts[:MAX_SENTENCES] for v in pair]
    )


def unpack(packed: array[float]) -> SentenceParts:
    values = [None if math.isnan(v) else v for v in packed]
    return tuple(zip(values[::2], values[1::2], strict=True))


def packed_parts(
    sentences: Sequence[SentenceParts | None],
) -> tuple[array[float] | None, ...]:
    """Every choice's parts, packed (None for a choice judged whole)."""
    return tuple(None if parts is None else pack(parts) for parts in sentences)


#: What claiming the feedback for (id, choice[, sentence]) found: the first word (``new``), the
#: same word again (``duplicate``), the other word (``conflict``), or no such response
#: any more (``unknown``: it expired between the lookup and the claim).
Claim = Literal["new", "duplicate", "conflict", "unknown"]


@dataclass(frozen=True, slots=True)
class Remembered:
    """What feedback needs to know about a past response."""

    tenant: str
    model: str
    confidences: tuple[float | None, ...]
    #: per choice, the shipped calibration's P(correct) behind its confidence (what a
    #: recalibration label is learnt on); None: the confidences themselves
    bases: tuple[float | None, ...] | None = None
    #: per choice, its sentence parts when it was judged by sentence (else None),
    #: packed (:func:`pack`; read them with :meth:`parts`)
    sentences: tuple[array[float] | None, ...] | None = None
    #: the feedback already recorded, by choice (``correct`` as given)
    feedback: dict[int, bool] = field(default_factory=dict, compare=False)
    #: the feedback already recorded on single sentences, by (choice, sentence)
    sentence_feedback: dict[tuple[int, int], bool] = field(default_factory=dict, compare=False)

    def base(self, choice: int) -> float | None:
        """The shipped P(correct) behind choice ``choice``'s confidence."""
        return self.confidences[choice] if self.bases is None else self.bases[choice]

    def parts(self, choice: int) -> SentenceParts | None:
        """Choice ``choice``'s sentence parts (the first :data:`MAX_SENTENCES`), or None
        when it was judged whole."""
        packed = None if self.sentences is None else self.sentences[choice]
        return None if packed is None else unpack(packed)

    def previous(self, choice: int, sentence: int | None) -> bool | None:
        """The feedback already recorded for the choice (or one of its sentences)."""
        if sentence is None:
            return self.feedback.get(choice)
        return self.sentence_feedback.get((choice, sentence))

    def note(self, choice: int, sentence: int | None, correct: bool) -> None:
        if sentence is None:
            self.feedback[choice] = correct
        else:
            self.sentence_feedback[(choice, sentence)] = correct


class SharedStateUnavailable(ProxyError):
    """The shared store (Redis) did not answer in time: try again shortly."""

    status = 503
    type = "server_error"
    code = "shared_state_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, int(self.retry_after + 0.999)))}


class FeedbackMemory(Protocol):
    """Remembers responses for feedback, and which of their choices got some."""

    def remember(
        self,
        response_id: str,
        tenant: str,
        model: str,
        confidences: Sequence[float | None],
        *,
        bases: Sequence[float | None] | None = None,
        sentences: Sequence[SentenceParts | None] | None = None,
    ) -> None:
        """Keep a response; never blocks the request (a shared store writes in the background).

        ``bases``: the shipped P(correct) per choice, when a recalibration answered;
        ``sentences``: per choice, its parts when judged by sentence.
        """
        ...

    async def lookup(self, tenant: str, response_id: str) -> Remembered | None:
        """The tenant's response, or None (unknown, expired, or another tenant's).

        Raises :class:`SharedStateUnavailable` when the store cannot answer.
        """
        ...

    async def claim_feedback(
        self,
        tenant: str,
        response_id: str,
        choice: int,
        correct: bool,
        sentence: int | None = None,
    ) -> Claim:
        """Record ``correct`` for (id, choice), or for one sentence of it, unless some
        feedback is there: atomically, so of two pods given the same feedback at once
        exactly one gets ``new``. A choice and each of its sentences are claimed apart.

        Raises :class:`SharedStateUnavailable` when the store cannot answer.
        """
        ...


class InMemoryFeedbackMemory:
    """The most recent ``size`` responses, in this process (least recently recorded go)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._recent: OrderedDict[str, Remembered] = OrderedDict()

    def remember(
        self,
        response_id: str,
        tenant: str,
        model: str,
        confidences: Sequence[float | None],
        *,
        bases: Sequence[float | None] | None = None,
        sentences: Sequence[SentenceParts | None] | None = None,
    ) -> None:
        self._recent[response_id] = Remembered(
            tenant,
            model,
            tuple(confidences),
            bases=None if bases is None else tuple(bases),
            sentences=None if sentences is None else packed_parts(sentences),
        )
        self._recent.move_to_end(response_id)
        while len(self._recent) > self.size:
            self._recent.popitem(last=False)

    def get(self, response_id: str) -> Remembered | None:
        """The response, whoever's it is."""
        return self._recent.get(response_id)

    def mark(
        self, response_id: str, choice: int, correct: bool, sentence: int | None = None
    ) -> None:
        """Note feedback for (id, choice[, sentence]), if the response is still remembered."""
        seen = self._recent.get(response_id)
        if seen is not None:
            seen.note(choice, sentence, correct)

    async def lookup(self, tenant: str, response_id: str) -> Remembered | None:
        seen = self._recent.get(response_id)
        return seen if seen is not None and seen.tenant == tenant else None

    async def claim_feedback(
        self,
        tenant: str,
        response_id: str,
        choice: int,
        correct: bool,
        sentence: int | None = None,
    ) -> Claim:
        # No await in here: the check and the write cannot interleave with another request.
        seen = self._recent.get(response_id)
        if seen is None or seen.tenant != tenant:
            return "unknown"
        previous = seen.previous(choice, sentence)
        if previous is None:
            seen.note(choice, sentence, correct)
            return "new"
        return "duplicate" if previous == correct else "conflict"
