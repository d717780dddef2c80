"""Per-tenant limits: what one request may cost, and how many a tenant may send.

Two kinds of limit, both set in the policy (``max_n``, ``max_upstream_calls``,
``max_concurrent_requests``, ``rate_limit_per_second``, ``rate_limit_burst``):

* per request, checked by :func:`check_request` before anything is sent upstream: the
  ``n`` a client may ask for, and the upstream calls the request would make (the main
  answer, fanned out when the upstream ignores ``n``, plus the samples). Going over is
  the client's to fix, so it is a 400 naming the field;
* per tenant, kept by a :class:`Limiter`: requests in flight at once, and a token bucket
  of ``rate_limit_per_second`` refilling up to ``rate_limit_burst``. Going over is a 429
  with ``Retry-After``.

:class:`Limiter` is the one place tenant counters live; :class:`MemoryLimiter` keeps them
in this process (each worker has its own). A limiter whose counters live elsewhere
(:class:`proxy.shared_state.redis_limiter.RedisLimiter`, shared by every pod) also has
:meth:`SharedLimiter.acquire_held`, which admits from what this process already holds,
:meth:`SharedLimiter.acquire_async`, which admission awaits instead, and
:meth:`SharedLimiter.acquire_overlapped`, which it lets decide alongside the request.

Pure: no web imports, and the clock is injected.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Protocol

from proxy.policy.rules import Rule

__all__ = [
    "CallBudget",
    "Lease",
    "Limiter",
    "MemoryLimiter",
    "Refusal",
    "SharedLimiter",
    "TooCostly",
    "check_request",
    "upstream_calls",
]

#: Retry-After for a refusal whose end cannot be predicted (a full concurrency slot).
CONCURRENCY_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the tenant's limits do not admit now."""

    message: str
    #: the policy key that refused: ``max_concurrent_requests`` or ``rate_limit_per_second``
    limit: str
    #: seconds after which the same request may be admitted
    retry_after: float


class Lease(Protocol):
    """An admitted request's hold on its tenant's limits, released when it ends."""

    def release(self) -> None:
        """Give the hold back; calling it again does nothing."""
        ...


class Limiter(Protocol):
    """Admits or refuses a tenant's requests against the rule's per-tenant limits."""

    def acquire(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        """A lease to release when the request ends, or why it may not start.

        ``now`` is in seconds on a monotonic clock (``time.monotonic()``).
        """
        ...


class SharedLimiter(Limiter, Protocol):
    """A :class:`Limiter` whose counters are elsewhere: admission awaits this instead."""

    def acquire_held(self, tenant: str, rule: Rule, now: float) -> Lease | None:
        """A lease from what this process already holds of the shared limits (a batch
        taken earlier), decided here at once; None: ask the shared counters."""
        ...

    async def acquire_async(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        """Like :meth:`Limiter.acquire`, deciding with the shared counters."""
        ...

    def acquire_overlapped(
        self, tenant: str, rule: Rule, now: float
    ) -> asyncio.Future[Lease | Refusal] | None:
        """:meth:`acquire_async` started and not awaited, when the tenant's last known
        headroom is wide enough that a refusal is unlikely: the request goes on while
        the shared counters decide. None: await :meth:`acquire_async` instead."""
        ...


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(slots=True)
class _MemoryLease:
    limiter: MemoryLimiter
    tenant: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self.tenant)


@dataclass(slots=True)
class MemoryLimiter:
    """Per-tenant concurrency and token buckets in this process's memory.

    Tenants come from the policy, so the tables stay as small as the tenant list. A
    rule that sets no limit costs a counter increment: in-flight counts are kept for
    every tenant, so the limits can be tightened on reload without a restart.
    """

    _in_flight: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` holding a lease now."""
        return self._in_flight.get(tenant, 0)

    def acquire(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        # Check everything before changing anything: a refusal consumes nothing.
        busy = self._in_flight.get(tenant, 0)
        cap = rule.max_concurrent_requests
        if cap is not None and busy >= cap:
            return Refusal(
                f"Too many concurrent requests: the limit is {cap} at a time.",
                "max_concurrent_requests",
                CONCURRENCY_RETRY_AFTER,
            )
        rate = rule.rate_limit_per_second
        bucket = None
        if rate is not None:
            burst = burst_size(rule)
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(float(burst), now)
            # A clock that steps back refills nothing; a lowered burst caps at once.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(burst), bucket.tokens + elapsed * rate)
            bucket.updated = max(bucket.updated, now)
            if bucket.tokens < 1.0:
                return Refusal(
                    f"Rate limit exceeded: {rate:g} requests per second (bursts of {burst}).",
                    "rate_limit_per_second",
                    (1.0 - bucket.tokens) / rate,
                )
        if bucket is not None:
            bucket.tokens -= 1.0
        self._in_flight[tenant] = busy + 1
        return _MemoryLease(self, tenant)

    def _release(self, tenant: str) -> None:
        left = self._in_flight.get(tenant, 0) - 1
        if left > 0:
            self._in_flight[tenant] = left
        else:
            self._in_flight.pop(tenant, None)


def burst_size(rule: Rule) -> int:
    """The bucket's capacity: ``rate_limit_burst``, else one second's worth (at least 1)."""
    if rule.rate_limit_burst is not None:
        return rule.rate_limit_burst
    rate = rule.rate_limit_per_second or 1.0
    return max(1, math.ceil(rate))


@dataclass(frozen=True, slots=True)
class CallBudget:
    """The upstream calls one request makes: the main answer's and the samples'."""

    main: int
    samples: int

    @property
    def total(self) -> int:
        return self.main + self.samples


@dataclass(frozen=True, slots=True)
class TooCostly:
    """A request over a per-request limit; ``param`` names the field the client can fix."""

    message: str
    #: the policy key that refused: ``max_n`` or ``max_upstream_calls``
    limit: str
    param: str


def upstream_calls(n: int, supports_n: bool, rule: Rule) -> CallBudget:
    """The upstream calls a request for ``n`` choices makes at most.

    The main answer is one call, or ``n`` single calls when the upstream ignores ``n``
    (see ``pipeline._fetch``). Samples (consistency and hybrid) are drawn once per
    request, whatever ``n``: one call per round when the upstream takes ``n``, one per
    sample otherwise (:func:`proxy.sampling.draw.draw_samples`). Counted at the budget,
    as if adaptive stopping never stopped early.
    """
    main = 1 if supports_n else n
    s = rule.sampling
    if s is None:
        return CallBudget(main, 0)
    if not supports_n:
        return CallBudget(main, s.samples)
    first = min(s.samples, max(s.round_size, s.min_samples))
    return CallBudget(main, 1 + math.ceil((s.samples - first) / s.round_size))


def check_request(n: int, supports_n: bool, rule: Rule) -> TooCostly | None:
    """Why a request for ``n`` choices costs more than the rule allows, or None."""
    if n > rule.max_n:
        return TooCostly(f"'n' is {n}, above this model's limit of {rule.max_n}.", "max_n", "n")
    calls = upstream_calls(n, supports_n, rule)
    if calls.total > rule.max_upstream_calls:
        return TooCostly(
            f"The request would make {calls.total} upstream calls ({calls.main} for the "
            f"answer, {calls.samples} for samples), above the limit of "
            f"{rule.max_upstream_calls}; ask for a smaller 'n'.",
            "max_upstream_calls",
            "n",
        )
    return None
