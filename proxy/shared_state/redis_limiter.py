"""Per-tenant limits shared by every pod: one Lua script per admission or per batch.

For a tenant whose rule sets ``max_concurrent_requests`` or ``rate_limit_per_second``,
one ``EVALSHA`` checks and takes both at once (atomic in Redis, so N pods cannot
together admit more than the limit). Far from the limits it takes a small batch of
tokens and slots that the next requests spend here without a round trip
(:mod:`proxy.shared_state.allowance`); near them, each request asks:

* concurrency: a sorted set ``{prefix}limit:{tenant}:leases`` of lease ids scored by
  their expiry (now + ``lease_seconds``, on Redis' clock). Expired leases are dropped
  before counting, so a pod that dies holding slots gives them back after at most
  ``lease_seconds`` (the TTL safety net); a normal release is a ``ZREM`` in the
  background, after the response.
* rate: a token bucket ``{prefix}limit:{tenant}:bucket`` (``tokens``, ``ts`` in ms of
  Redis' ``TIME``, so pods' clocks do not matter), the same arithmetic as
  :class:`~proxy.limits.MemoryLimiter`, expiring once it would be full again anyway.

A refusal consumes nothing. A tenant with neither limit never touches Redis. What a
batch leaves unused goes back when its second is up: its slots are removed from the
lease set, its tokens added back to the bucket. When Redis
fails or is backing off, the request is decided by this process's
:class:`~proxy.limits.MemoryLimiter` instead (each pod then allows the whole limit).
Releases (like remembering responses) are queued and sent together after the response;
those that could not reach Redis are queued again after the next successful acquire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.limits import (
    CONCURRENCY_RETRY_AFTER,
    Lease,
    MemoryLimiter,
    Refusal,
    burst_size,
)
from proxy.policy.rules import Rule
from proxy.shared_state.allowance import (
    ALLOWANCE_SECONDS,
    MAX_SLOTS,
    MAX_TOKENS,
    MIN_SLOTS,
    MIN_TOKENS,
    Allowance,
    Limits,
    batch_size,
)
from proxy.shared_state.memory import SharedStateUnavailable
from proxy.shared_state.redis_limit_scripts import ACQUIRE, RETURN_TOKENS
from proxy.shared_state.redis_state import RedisState

#: How long the headroom of a tenant's last admission is trusted for overlapping.
HEADROOM_SECONDS = 1.0
#: The share of a limit that must be known free for a request to overlap its check.
HEADROOM_SHARE = 0.25


@dataclass(slots=True)
class _Headroom:
    """What the last admission of a tenant said was left, and when (monotonic)."""

    tokens: float | None  # None: no rate limit
    held: int | None  # None: no concurrency cap
    at: float


#: Releases kept for a retry when Redis could not take them (beyond: the TTL frees them).
_UNRELEASED_MAX = 10_000


@dataclass(slots=True)
class _RedisLease:
    limiter: RedisLimiter
    key: str | None  # None: the rule has no concurrency cap, nothing to give back
    lease_id: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.key is not None:
                self.limiter._release(self.key, self.lease_id)


@dataclass(slots=True)
class _HeldLease:
    """A request admitted from this pod's :class:`~proxy.shared_state.allowance.Allowance`."""

    limiter: RedisLimiter
    tenant: str
    allowance: Allowance
    slot: str | None  # None: the rule has no concurrency cap
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._held_released(self)


class RedisLimiter:
    """:class:`~proxy.limits.Limiter` whose counters live in Redis, with a local fallback."""

    def __init__(
        self,
        state: RedisState,
        *,
        lease_seconds: float = 600.0,
        local: MemoryLimiter | None = None,
        allowance_seconds: float = ALLOWANCE_SECONDS,
    ) -> None:
        self.state = state
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.allowance_seconds = allowance_seconds
        #: decides while Redis is unreachable, and for tenants without limits
        self.local = local if local is not None else MemoryLimiter()
        self._unreleased: deque[tuple[str, str]] = deque(maxlen=_UNRELEASED_MAX)
        #: per tenant (policy names only, so bounded): the last admission's headroom
        self._headroom: dict[str, _Headroom] = {}
        #: per tenant: overlapped checks started here and not answered yet
        self._pending: dict[str, int] = {}
        #: the overlapped checks in flight (a task must be referenced until it is done)
        self._overlapped: set[asyncio.Task[Lease | Refusal]] = set()
        #: per tenant: the batch of tokens and slots this pod spends from now
        self._allowances: dict[str, Allowance] = {}
        #: per tenant: requests admitted from batches here and not ended yet
        self._held: dict[str, int] = {}
        #: tenants with a batch being asked for, and the background asks in flight
        self._renewing: set[str] = set()
        self._renewals: set[asyncio.Task[None]] = set()

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` holding a local lease (fallback or unlimited) here."""
        return self.local.in_flight(tenant)

    def acquire(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        """The synchronous :class:`~proxy.limits.Limiter` call: this process only."""
        return self.local.acquire(tenant, rule, now)

    def acquire_held(self, tenant: str, rule: Rule, now: float) -> Lease | None:
        """A lease from the batch this pod holds for ``tenant``, without a round trip;
        None when there is none left to spend (then ask Redis). A batch running low
        starts the ask for the next one in the background."""
        allowance = self._allowances.get(tenant)
        if allowance is None or not allowance.usable(_limits(rule), now):
            return None
        lease = self._held_lease(tenant, allowance)
        if tenant not in self._renewing and allowance.running_low(now):
            self._renewing.add(tenant)
            task = asyncio.get_running_loop().create_task(self._renew(tenant, rule, now))
            self._renewals.add(task)
            task.add_done_callback(self._renewals.discard)
        return lease

    async def acquire_async(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        """Shared across pods through Redis; local when Redis does not answer in time."""
        cap = rule.max_concurrent_requests
        rate = rule.rate_limit_per_second
        if cap is None and rate is None:
            return self.local.acquire(tenant, rule, now)
        lease_id = uuid.uuid4().hex
        # One batch asked for at a time per tenant: the requests meanwhile ask for one.
        want = (1, 1) if tenant in self._renewing else self._batch_wanted(tenant, rule, now)
        batch = want != (1, 1)
        if batch:
            self._renewing.add(tenant)
        try:
            got = await self._run_acquire(tenant, rule, lease_id, want)
        except SharedStateUnavailable:
            return self.local.acquire(tenant, rule, now)
        finally:
            if batch:
                self._renewing.discard(tenant)
        if int(got[0]) == 1:
            if len(got) >= 5 and (int(got[3]) > 1 or int(got[4]) > 1):
                return self._held_lease(
                    tenant, self._install(tenant, rule, lease_id, int(got[3]), int(got[4]))
                )
            return _RedisLease(
                self, self._key(tenant, "leases") if cap is not None else None, lease_id
            )
        limit = _text(got[1])
        if limit == "max_concurrent_requests":
            return Refusal(
                f"Too many concurrent requests: the limit is {cap} at a time.",
                limit,
                CONCURRENCY_RETRY_AFTER,
            )
        return Refusal(
            f"Rate limit exceeded: {rate:g} requests per second (bursts of {burst_size(rule)}).",
            "rate_limit_per_second",
            float(_text(got[2])),
        )

    async def _run_acquire(
        self, tenant: str, rule: Rule, lease_id: str, want: tuple[int, int]
    ) -> Any:
        """The ACQUIRE script's reply (the headroom it shows noted), within the deadline."""
        cap = rule.max_concurrent_requests
        rate = rule.rate_limit_per_second
        args = [
            -1 if cap is None else cap,
            0 if rate is None else float(rate),
            burst_size(rule),
            lease_id,
            self.lease_ms,
            *want,
        ]
        keys = [self._key(tenant, "bucket"), self._key(tenant, "leases")]
        got = await self.state.run(
            "limit_acquire",
            lambda client: self.state.script(ACQUIRE)(keys=keys, args=args, client=client),
        )
        if self._unreleased:
            self._retry_releases()
        if int(got[0]) == 1:
            if len(got) >= 3:
                self._note_headroom(tenant, got)
        else:
            self._headroom.pop(tenant, None)  # at the limit: the next requests wait again
        return got

    async def _renew(self, tenant: str, rule: Rule, now: float) -> None:
        """Ask for the next batch while this one is still being spent (no request waits)."""
        try:
            want = self._batch_wanted(tenant, rule, now)
            if want == (1, 1):
                return  # near a limit now: the requests ask one by one
            with contextlib.suppress(SharedStateUnavailable):
                lease_id = uuid.uuid4().hex
                got = await self._run_acquire(tenant, rule, lease_id, want)
                if int(got[0]) == 1 and len(got) >= 5:
                    self._install(tenant, rule, lease_id, int(got[3]), int(got[4]))
        finally:
            self._renewing.discard(tenant)

    def acquire_overlapped(
        self, tenant: str, rule: Rule, now: float
    ) -> asyncio.Future[Lease | Refusal] | None:
        """The shared check as a task, when this tenant's last admission left at least
        :data:`HEADROOM_SHARE` of each limit free (less the checks still pending here)
        within the last :data:`HEADROOM_SECONDS`; None otherwise.

        The check itself is the same script: a refusal still refuses (the request's
        upstream call, started meanwhile, is then cancelled). Overlapping only saves the
        round trip's wait, and it is tried only where a refusal is unlikely, so that
        upstream calls begun for requests then refused stay rare: near a limit, after a
        refusal, with Redis down, or for a tenant not heard of for a second, admission
        waits for the answer as before.
        """
        room = self._headroom.get(tenant)
        if room is None or not self.state.available or not 0 <= now - room.at <= HEADROOM_SECONDS:
            return None
        rate, cap = rule.rate_limit_per_second, rule.max_concurrent_requests
        pending = self._pending.get(tenant, 0)
        if rate is not None:
            burst = burst_size(rule)
            if room.tokens is None:
                return None
            tokens = min(float(burst), room.tokens + (now - room.at) * rate) - pending
            if tokens < max(2.0, HEADROOM_SHARE * burst):
                return None
        if cap is not None and (
            room.held is None or cap - room.held - pending < max(2.0, HEADROOM_SHARE * cap)
        ):
            return None
        self._pending[tenant] = pending + 1
        task = asyncio.get_running_loop().create_task(self.acquire_async(tenant, rule, now))
        self._overlapped.add(task)

        def answered(done: asyncio.Task[Lease | Refusal]) -> None:
            self._overlapped.discard(done)
            left = self._pending.get(tenant, 1) - 1
            if left > 0:
                self._pending[tenant] = left
            else:
                self._pending.pop(tenant, None)

        task.add_done_callback(answered)
        return task

    def _batch_wanted(self, tenant: str, rule: Rule, now: float) -> tuple[int, int]:
        """(tokens, slots) to ask for: a batch when every limit the rule sets is known,
        within the last second, to be far from reached; else one request's (1, 1)."""
        room = self._headroom.get(tenant)
        if room is None or not self.state.available or not 0 <= now - room.at <= HEADROOM_SECONDS:
            return 1, 1
        rate, cap = rule.rate_limit_per_second, rule.max_concurrent_requests
        pending = self._pending.get(tenant, 0)
        previous = self._allowances.get(tenant)
        tokens = slots = 1
        if rate is not None:
            if room.tokens is None:
                return 1, 1
            free = min(float(burst_size(rule)), room.tokens + (now - room.at) * rate) - pending
            demand = previous.used if previous is not None else 0
            tokens = batch_size(free, demand, least=MIN_TOKENS, most=MAX_TOKENS)
            if tokens < 2:
                return 1, 1
        if cap is not None:
            if room.held is None:
                return 1, 1
            demand = self._held.get(tenant, 0) + 1
            slots = batch_size(cap - room.held - pending, demand, least=MIN_SLOTS, most=MAX_SLOTS)
            if slots < 2:
                return 1, 1
        return tokens, slots

    def _install(
        self, tenant: str, rule: Rule, lease_id: str, tokens: int, slots: int
    ) -> Allowance:
        """Keep a granted batch to spend from, handing back the one before."""
        previous = self._allowances.pop(tenant, None)
        if previous is not None:
            self._hand_back(tenant, previous)
        ids = [lease_id, *(f"{lease_id}:{i}" for i in range(2, slots + 1))] if slots > 0 else []
        moment = time.monotonic()
        allowance = Allowance(
            limits=_limits(rule),
            tokens=tokens if tokens >= 0 else None,
            idle=ids[::-1],  # popped from the end: the lease id first
            until=moment + self.allowance_seconds,
            since=moment,
            granted=max(tokens, 0),
        )
        self._allowances[tenant] = allowance
        asyncio.get_running_loop().call_later(
            self.allowance_seconds, self._expire, tenant, allowance
        )
        return allowance

    def _held_lease(self, tenant: str, allowance: Allowance) -> _HeldLease:
        self._held[tenant] = self._held.get(tenant, 0) + 1
        return _HeldLease(self, tenant, allowance, allowance.take())

    def _held_released(self, lease: _HeldLease) -> None:
        tenant = lease.tenant
        left = self._held.get(tenant, 1) - 1
        if left > 0:
            self._held[tenant] = left
        else:
            self._held.pop(tenant, None)
        slot = lease.slot
        if slot is not None and not lease.allowance.give_back(slot, time.monotonic()):
            self._release(self._key(tenant, "leases"), slot)

    def _expire(self, tenant: str, allowance: Allowance) -> None:
        if self._allowances.get(tenant) is allowance:
            del self._allowances[tenant]
        self._hand_back(tenant, allowance)

    def _hand_back(self, tenant: str, allowance: Allowance) -> None:
        """What is left of a batch back to Redis, in the background: its idle slots out
        of the lease set (retried like any release), its unused tokens to the bucket
        (lost if Redis does not take them: fewer admitted, never more)."""
        idle, tokens = allowance.retire()
        for slot in idle:
            self._release(self._key(tenant, "leases"), slot)
        if tokens > 0:
            bucket = self._key(tenant, "bucket")
            self.state.enqueue(
                "limit_release", lambda pipe: pipe.eval(RETURN_TOKENS, 1, bucket, tokens)
            )

    async def hand_back_all(self) -> None:
        """Every batch held here back to Redis (at shutdown, before the last writes),
        once the asks in flight (each within its deadline) have landed."""
        await asyncio.gather(*self._renewals, return_exceptions=True)
        for tenant, allowance in list(self._allowances.items()):
            del self._allowances[tenant]
            self._hand_back(tenant, allowance)

    def _key(self, tenant: str, name: str) -> str:
        return f"{self.state.prefix}limit:{tenant}:{name}"

    def _note_headroom(self, tenant: str, got: Any) -> None:
        left, held = float(_text(got[1])), int(got[2])
        self._headroom[tenant] = _Headroom(
            tokens=None if left < 0 else left, held=None if held < 0 else held, at=time.monotonic()
        )

    def _release(self, key: str, lease_id: str) -> None:
        def failed() -> None:
            self._unreleased.append((key, lease_id))

        self.state.enqueue("limit_release", lambda pipe: pipe.zrem(key, lease_id), failed)

    def _retry_releases(self) -> None:
        while self._unreleased:
            self._release(*self._unreleased.popleft())


def _limits(rule: Rule) -> Limits:
    return rule.max_concurrent_requests, rule.rate_limit_per_second, burst_size(rule)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
