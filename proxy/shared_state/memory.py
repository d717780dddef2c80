"""The feedback memory: what ``POST /v1/feedback`` needs to know about past responses.

:class:`FeedbackMemory` is the interface; :class:`InMemoryFeedbackMemory` the default
(bounded, per process), :class:`proxy.shared_state.redis_memory.RedisFeedbackMemory`
the shared one (a TTL per response, idempotent across pods).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from proxy.errors import ProxyError

#: What claiming the feedback for (id, choice) found: the first word (``new``), the
#: same word again (``duplicate``), the other word (``conflict``), or no such response
#: any more (``unknown``: it expired between the lookup and the claim).
Claim = Literal["new", "duplicate", "conflict", "unknown"]


@dataclass(frozen=True, slots=True)
class Remembered:
    """What feedback needs to know about a past response."""

    tenant: str
    model: str
    confidences: tuple[float | None, ...]
    #: the feedback already recorded, by choice (``correct`` as given)
    feedback: dict[int, bool] = field(default_factory=dict, compare=False)


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
        self, response_id: str, tenant: str, model: str, confidences: Sequence[float | None]
    ) -> None:
        """Keep a response; never blocks the request (a shared store writes in the background)."""
        ...

    async def lookup(self, tenant: str, response_id: str) -> Remembered | None:
        """The tenant's response, or None (unknown, expired, or another tenant's).

        Raises :class:`SharedStateUnavailable` when the store cannot answer.
        """
        ...

    async def claim_feedback(
        self, tenant: str, response_id: str, choice: int, correct: bool
    ) -> Claim:
        """Record ``correct`` for (id, choice) unless some feedback is there: atomically,
        so of two pods given the same feedback at once exactly one gets ``new``.

        Raises :class:`SharedStateUnavailable` when the store cannot answer.
        """
        ...


class InMemoryFeedbackMemory:
    """The most recent ``size`` responses, in this process (least recently recorded go)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._recent: OrderedDict[str, Remembered] = OrderedDict()

    def remember(
        self, response_id: str, tenant: str, model: str, confidences: Sequence[float | None]
    ) -> None:
        self._recent[response_id] = Remembered(tenant, model, tuple(confidences))
        self._recent.move_to_end(response_id)
        while len(self._recent) > self.size:
            self._recent.popitem(last=False)

    def get(self, response_id: str) -> Remembered | None:
        """The response, whoever's it is."""
        return self._recent.get(response_id)

    def mark(self, response_id: str, choice: int, correct: bool) -> None:
        """Note feedback for (id, choice), if the response is still remembered."""
        seen = self._recent.get(response_id)
        if seen is not None:
            seen.feedback[choice] = correct

    async def lookup(self, tenant: str, response_id: str) -> Remembered | None:
        seen = self._recent.get(response_id)
        return seen if seen is not None and seen.tenant == tenant else None

    async def claim_feedback(
        self, tenant: str, response_id: str, choice: int, correct: bool
    ) -> Claim:
        # No await in here: the check and the write cannot interleave with another request.
        seen = self._recent.get(response_id)
        if seen is None or seen.tenant != tenant:
            return "unknown"
        previous = seen.feedback.get(choice)
        if previous is None:
            seen.feedback[choice] = correct
            return "new"
        return "duplicate" if previous == correct else "conflict"
