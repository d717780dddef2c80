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
#: Returns {1} when admitted, {0, limit, retry_after} when refused.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
if cap >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then
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
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - 1),
             'ts', string.format('%d', math.max(ts, now)))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
end
if cap >= 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {1}
"""

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
            return _RedisLease(self, leases if cap is not None else None, lease_id)
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

    def _release(self, key: str, lease_id: str) -> None:
        def failed() -> None:
            self._unreleased.append((key, lease_id))

        self.state.enqueue("limit_release", lambda pipe: pipe.zrem(key, lease_id), failed)

    def _retry_releases(self) -> None:
        while self._unreleased:
            self._release(*self._unreleased.popleft())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
