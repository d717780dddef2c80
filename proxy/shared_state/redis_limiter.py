"""Per-tenant limits shared by every pod: one Lua script per admitted request.

For a tenant whose rule sets ``max_concurrent_requests`` or ``rate_limit_per_second``,
one ``EVALSHA`` checks and takes both at once (atomic in Redis, so N pods cannot
together admit more than the limit):

* concurrency: a sorted set ``{prefix}limit:{tenant}:leases`` of lease ids scored by
  their expiry (now + ``lease_seconds``, on Redis' clock). Expired leases are dropped
  before counting, so a pod that dies holding slots gives them back after at most
  ``lease_seconds`` (the TTL safety net); a normal release is a ``ZREM`` in the
  background, after the response.
* rate: a token bucket ``{prefix}limit:{tenant}:bucket`` (``tokens``, ``ts`` in ms of
  Redis' ``TIME``, so pods' clocks do not matter), the same arithmetic as
  :class:`~proxy.limits.MemoryLimiter`, expiring once it would be full again anyway.

A refusal consumes nothing. A tenant with neither limit never touches Redis. When Redis
fails or is backing off, the request is decided by this process's
:class:`~proxy.limits.MemoryLimiter` instead (each pod then allows the whole limit).
Releases (like remembering responses) are queued and sent together after the response;
those that could not reach Redis are queued again after the next successful acquire.
"""

from __future__ import annotations

import asyncio
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
from proxy.shared_state.memory import SharedStateUnavailable
from proxy.shared_state.redis_state import RedisState

#: KEYS: bucket, leases. ARGV: cap (-1 none), rate (0 none), burst, lease id, lease ms.
#: Returns {1, tokens left, leases held} when admitted (-1: that limit is not set),
#: {0, limit, retry_after} when refused.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
local held = -1
local left = '-1'
if cap >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2])
  if held >= cap then
    return {0, 'max_concurrent_requests', '0'}
  end
end
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(b[1])
  local ts = tonumber(b[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
  if tokens < 1 then
    return {0, 'rate_limit_per_second', string.format('%.6f', (1 - tokens) / rate)}
  end
  left = string.format('%.6f', tokens - 1)
  redis.call('HSET', KEYS[1], 'tokens', left, 'ts', string.format('%d', math.max(ts, now)))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
end
if cap >= 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
  held = held + 1
end
return {1, left, held}
"""

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


class RedisLimiter:
    """:class:`~proxy.limits.Limiter` whose counters live in Redis, with a local fallback."""

    def __init__(
        self,
        state: RedisState,
        *,
        lease_seconds: float = 600.0,
        local: MemoryLimiter | None = None,
    ) -> None:
        self.state = state
        self.lease_ms = max(1, int(lease_seconds * 1000))
        #: decides while Redis is unreachable, and for tenants without limits
        self.local = local if local is not None else MemoryLimiter()
        self._unreleased: deque[tuple[str, str]] = deque(maxlen=_UNRELEASED_MAX)
        #: per tenant (policy names only, so bounded): the last admission's headroom
        self._headroom: dict[str, _Headroom] = {}
        #: per tenant: overlapped checks started here and not answered yet
        self._pending: dict[str, int] = {}
        #: the overlapped checks in flight (a task must be referenced until it is done)
        self._overlapped: set[asyncio.Task[Lease | Refusal]] = set()

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` holding a local lease (fallback or unlimited) here."""
        return self.local.in_flight(tenant)

    def acquire(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        """The synchronous :class:`~proxy.limits.Limiter` call: this process only."""
        return self.local.acquire(tenant, rule, now)

    async def acquire_async(self, tenant: str, rule: Rule, now: float) -> Lease | Refusal:
        """Shared across pods through Redis; local when Redis does not answer in time."""
        cap = rule.max_concurrent_requests
        rate = rule.rate_limit_per_second
        if cap is None and rate is None:
            return self.local.acquire(tenant, rule, now)
        prefix = f"{self.state.prefix}limit:{tenant}:"
        leases = prefix + "leases"
        lease_id = uuid.uuid4().hex
        args = [
            -1 if cap is None else cap,
            0 if rate is None else float(rate),
            burst_size(rule),
            lease_id,
            self.lease_ms,
        ]
        try:
            got = await self.state.run(
                "limit_acquire",
                lambda client: self.state.script(ACQUIRE)(
                    keys=[prefix + "bucket", leases], args=args, client=client
                ),
            )
        except SharedStateUnavailable:
            return self.local.acquire(tenant, rule, now)
        if self._unreleased:
            self._retry_releases()
        if int(got[0]) == 1:
            if len(got) >= 3:
                self._note_headroom(tenant, got)
            return _RedisLease(self, leases if cap is not None else None, lease_id)
        self._headroom.pop(tenant, None)  # at the limit: the next requests wait again
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
