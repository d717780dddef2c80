"""The Lua scripts of the shared recalibration store
(:mod:`proxy.shared_state.redis_recalibration`).

Each runs atomically in Redis, so that of two pods writing a map for one tenant and
model at once, the version rule decides: SWAP writes only the version one past the
stored one, RESTORE only a version newer than the stored one.
"""

from __future__ import annotations

# The version in a stored map, 0 when there is none or it cannot be read.
_VERSION_OF = """
local function version_of(raw)
  if not raw then return 0 end
  local ok, data = pcall(cjson.decode, raw)
  if ok and type(data) == 'table' and tonumber(data['version']) then
    return tonumber(data['version'])
  end
  return 0
end
"""

#: KEYS: maps, epoch. ARGV: field, new version, map JSON, new epoch token.
#: Returns {1, ''} when swapped in, {0, stored map JSON or ''} when not.
SWAP = (
    _VERSION_OF
    + """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if version_of(stored) + 1 ~= tonumber(ARGV[2]) then
  return {0, stored or ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
return {1, ''}
"""
)

#: Write a map back (Redis lost it, or holds an older one). Same KEYS and ARGV as SWAP.
#: Returns 1 when written, 0 when Redis already has this version or a newer one.
RESTORE = (
    _VERSION_OF
    + """
if version_of(redis.call('HGET', KEYS[1], ARGV[1])) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
return 1
"""
)
