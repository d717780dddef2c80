"""The Lua scripts of the shared limiter (:mod:`proxy.shared_state.redis_limiter`).

Each runs atomically in Redis (ACQUIRE on Redis' own clock, ``TIME``, so pods' clocks
do not matter), so that any number of pods deciding at once cannot together admit more
than a tenant's limits.
"""

from __future__ import annotations

#: KEYS: bucket, leases. ARGV: cap (-1 none), rate (0 none), burst, lease id, lease ms,
#: tokens wanted, slots wanted (a batch, :mod:`proxy.shared_state.allowance`; 1 and 1
#: for one request). Admits if one request fits, granting up to what was wanted:
#: returns {1, tokens left, leases held, tokens granted, slots granted} (-1: that limit
#: is not set); the slots are the lease id, then ``id:2``, ``id:3`` and so on.
#: Returns {0, limit, retry_after} when refused.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
local want_tokens = tonumber(ARGV[6] or '1')
local want_slots = tonumber(ARGV[7] or '1')
local held = -1
local left = '-1'
local tokens_granted = -1
local slots_granted = -1
if cap >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2])
  if held >= cap then
    return {0, 'max_concurrent_requests', '0'}
  end
  slots_granted = math.max(1, math.min(want_slots, cap - held))
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
  tokens_granted = math.max(1, math.min(want_tokens, math.floor(tokens)))
  left = string.format('%.6f', tokens - tokens_granted)
  redis.call('HSET', KEYS[1], 'tokens', left, 'ts', string.format('%d', math.max(ts, now)))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
end
if cap >= 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  for i = 2, slots_granted do
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[4] .. ':' .. i)
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
  held = held + slots_granted
end
return {1, left, held, tokens_granted, slots_granted}
"""

#: KEYS: bucket. ARGV: tokens. Gives a batch's unused tokens back to a bucket that
#: still exists (one that expired is full anyway); the next ACQUIRE caps it at the burst.
RETURN_TOKENS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[1])
end
return 1
"""
