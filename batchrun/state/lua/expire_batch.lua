-- expire_batch: give an ended batch's keys their expiry (keep_days), once no
-- request of it is in flight any more (whatever lands after this would
-- otherwise write keys that never expire). Atomic with reopening: a batch that
-- runs again is left alone.
-- KEYS[1]  batch key
-- KEYS[2]  set of ended batches waiting for this
-- KEYS[3]  parked shards (sorted set "batch_id:shard" -> due ms)
-- ARGV[1]  batch id
-- ARGV[2..] the names of the batch's sub-keys (without the per-shard todo sets)
-- Returns  1 if done, 0 if the batch is not ended (dropped from the set), -1 if it has
--          requests in flight (kept in the set for a later round)
local b = KEYS[1]
local f = redis.call('HMGET', b, 'state', 'keep_days', 'shards')
if f[1] ~= 'finished' and f[1] ~= 'cancelled' then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
local last = redis.call('ZRANGE', b .. ':leases', -1, -1, 'WITHSCORES')
if #last > 0 then
  local t = redis.call('TIME')
  -- Leases still live: wait for them. Lapsed ones (a worker died; nobody reclaims
  -- an ended batch's jobs) do not hold the expiry back.
  if tonumber(last[2]) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return -1 end
end
local ttl = math.max(1, math.floor((tonumber(f[2] or '7') or 7) * 86400))
redis.call('EXPIRE', b, ttl)
for i = 2, #ARGV do redis.call('EXPIRE', b .. ':' .. ARGV[i], ttl) end
for shard = 0, math.max(0, (tonumber(f[3] or '0') or 0) - 1) do
  redis.call('EXPIRE', b .. ':todo:' .. shard, ttl)
  redis.call('ZREM', KEYS[3], ARGV[1] .. ':' .. shard)
end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
