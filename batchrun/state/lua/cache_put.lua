-- cache_put: store one answer in the shared response cache, and keep the cache within its size
-- bound, atomically (so that workers storing at once cannot take it past the bound together).
-- Entries expire by themselves (PX); the index orders them by expiry, so that the expired go
-- first and, past the bound, those nearest their expiry.
-- KEYS[1]  the entry's key (batchrun:{cache}:e:HASH)
-- KEYS[2]  index: sorted set HASH -> expiry ms
-- KEYS[3]  sizes: hash HASH -> "bytes stored_ms"
-- KEYS[4]  the total bytes the index holds (a string counter)
-- ARGV[1]  HASH
-- ARGV[2]  the entry (bytes)
-- ARGV[3]  its time to live, ms (>= 1)
-- ARGV[4]  the bound, bytes
-- ARGV[5]  the prefix of entry keys (KEYS[1] minus HASH), for entries evicted
-- Returns  {1 stored / 0 too big for the bound, entries evicted}
local hash, value = ARGV[1], ARGV[2]
local ttl, bound, prefix = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local size = #value + #hash
if size > bound then return {0, 0} end
local now = now_whole_ms()
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local function forget(h)
  local old = redis.call('HGET', KEYS[3], h)
  if old then total = total - tonumber(string.match(old, '^(%d+)')) end
  redis.call('HDEL', KEYS[3], h)
  redis.call('ZREM', KEYS[2], h)
end
forget(hash)  -- an answer stored again (--refresh, two runners) replaces the old one
local evicted = 0
-- Expired entries first (Redis dropped their values already), then the soonest to expire.
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, h in ipairs(gone) do forget(h); evicted = evicted + 1 end
while total + size > bound do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then break end
  forget(first[1])
  redis.call('DEL', prefix .. first[1])
  evicted = evicted + 1
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[1], value, 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, hash)
redis.call('HSET', KEYS[3], hash, size .. ' ' .. now)
redis.call('SET', KEYS[4], total + size)
return {1, evicted}
