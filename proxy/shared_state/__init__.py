"""State that several pods (or workers) share: the feedback memory and tenant limits.

Without ``ABSTAIN_REDIS_URL`` both live in the process (:class:`InMemoryFeedbackMemory`,
:class:`proxy.limits.MemoryLimiter`), and nothing here imports Redis. With it,
:mod:`proxy.shared_state.redis_state` holds the one client every shared piece goes
through: each call has a deadline (``ABSTAIN_REDIS_TIMEOUT_SECONDS``), and a failure
is counted, logged (at most once a minute) and answered locally:

* limits fall back to this process's :class:`~proxy.limits.MemoryLimiter` (each pod
  then enforces the whole tenant limit on its own);
* ``POST /v1/feedback`` answers 503 ``shared_state_unavailable`` with ``Retry-After``
  (not queued: a label the client retries later cannot be lost by a pod that dies);
* remembering a response for feedback is a background write, never awaited by the
  request; one that fails leaves that response unknown to feedback (404 later).

After a failure Redis is left alone for ``ABSTAIN_REDIS_RETRY_SECONDS`` so an outage
does not cost every request the timeout; the next call after that tries again, and
service resumes by itself.
"""

from __future__ import annotations

from proxy.shared_state.memory import (
    Claim,
    FeedbackMemory,
    InMemoryFeedbackMemory,
    Remembered,
    SharedStateUnavailable,
)

__all__ = [
    "Claim",
    "FeedbackMemory",
    "InMemoryFeedbackMemory",
    "Remembered",
    "SharedStateUnavailable",
]
