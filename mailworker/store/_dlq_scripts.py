"""The Lua scripts of the dead-letter store (:mod:`mailworker.store.deadletter`).

Each runs atomically in Redis, so the index, the records, the payloads, the payload index
and the byte count (the layout in :mod:`mailworker.store.keys`) always agree. Every script
takes those five keys, in that order.
"""

from __future__ import annotations

__all__ = ["ADD", "PRUNE", "REMOVE"]

# KEYS: index, records, payloads, payload index, byte count (the layout above).
_FUNCTIONS = """
local function count(bytes)
    if bytes ~= 0 and redis.call('INCRBY', KEYS[5], bytes) <= 0 then
        redis.call('DEL', KEYS[5])
    end
end
local function size(id)
    return redis.call('HSTRLEN', KEYS[2], id) + redis.call('HSTRLEN', KEYS[3], id)
end
local function drop(ids)
    local existed, bytes = 0, 0
    for _, id in ipairs(ids) do
        bytes = bytes + size(id)
        local z = redis.call('ZREM', KEYS[1], id)
        local h = redis.call('HDEL', KEYS[2], id)
        redis.call('HDEL', KEYS[3], id)
        redis.call('ZREM', KEYS[4], id)
        if z + h > 0 then
            existed = existed + 1
        end
    end
    count(-bytes)
    return existed
end
"""

# ARGV: id, time, record JSON, payload JSON ('' to keep none).
_ADD = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local bytes = string.len(ARGV[3])
if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
    redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
    bytes = bytes + string.len(ARGV[4])
end
count(bytes)
"""

# ARGV: the ids. Returns how many existed.
_REMOVE = """
return drop(ARGV)
"""

# Drop up to ARGV[3] records older than ARGV[1]; with room left in that batch, also the
# oldest beyond ARGV[2] records (0: no limit); with room left, while the store holds more
# than ARGV[4] bytes (0: no limit), evict the oldest payloads, then the oldest records.
# Returns {records dropped, records and payloads dropped}; the caller repeats while a full
# batch went, so a large backlog never blocks Redis long.
_PRUNE = """
local batch = tonumber(ARGV[3])
local max = tonumber(ARGV[2])
local budget = tonumber(ARGV[4])
local n = drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, batch))
if n < batch and max > 0 then
    local excess = redis.call('ZCARD', KEYS[1]) - max
    if excess > 0 then
        n = n + drop(redis.call('ZRANGE', KEYS[1], 0, math.min(excess, batch - n) - 1))
    end
end
local work = n
if budget > 0 then
    local total = tonumber(redis.call('GET', KEYS[5]) or '0')
    while total > budget and work < batch do
        local id = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
        if not id then
            break
        end
        local bytes = redis.call('HSTRLEN', KEYS[3], id)
        redis.call('HDEL', KEYS[3], id)
        redis.call('ZREM', KEYS[4], id)
        count(-bytes)
        total = total - bytes
        work = work + 1
    end
    while total > budget and work < batch do
        local id = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
        if not id then
            break
        end
        total = total - size(id)
        n = n + drop({id})
        work = work + 1
    end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[5])
end
return {n, work}
"""

#: Store one record: ARGV id, time added, record JSON, payload JSON ('' to keep none).
ADD = _FUNCTIONS + _ADD

#: Delete records: ARGV their ids. Returns how many existed.
REMOVE = _FUNCTIONS + _REMOVE

#: Apply the retention limits, one batch: ARGV cutoff time, max records, batch, max bytes.
PRUNE = _FUNCTIONS + _PRUNE
