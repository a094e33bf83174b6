-- expire_batch: give an ended batch's keys their expiry (keep_days), once no
-- request of it is in flight any more (whatever lands after this would
-- otherwise write keys that never expire). Atomic with reopening: a batch that
-- runs again is left alone.
-- KEYS[1]  batch key
-- KEYS[2]  set of ended batches waiting for this
-- KEYS[3]  parked shards (sorted set "batch_id:shard" -> due ms)
-- KEYS[4]  the batch's leases (custom_id -> expiry ms)
-- KEYS[5..] its other keys (keys.SUBKEYS but leases; the per-shard todo sets are not among them)
-- ARGV[1]  batch id
-- ARGV[2]  the prefix of its shards' todo sets (keys.todo_prefix: the shard number follows)
-- ARGV[3]  the prefix of its shards' parked members (keys.parked_prefix)
-- Returns  1 if done, 0 if the batch is not ended (dropped from the set), -1 if it has
--          requests in flight (kept in the set for a later round)
local b = KEYS[1]
local f = redis.call('HMGET', b, 'state', 'keep_days', 'shards')
if f[1] ~= 'finished' and f[1] ~= 'cancelled' then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
if #last > 0 then
  -- Leases still live: wait for them. Lapsed ones (a worker died; nobody reclaims
  -- an ended batch's jobs) do not hold the expiry back.
  if tonumber(last[2]) > now_whole_ms() then return -1 end
end
local ttl = math.max(1, math.floor((tonumber(f[2] or '7') or 7) * 86400))
redis.call('EXPIRE', b, ttl)
for i = 4, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
for shard = 0, math.max(0, (tonumber(f[3] or '0') or 0) - 1) do
  redis.call('EXPIRE', ARGV[2] .. shard, ttl)
  redis.call('ZREM', KEYS[3], ARGV[3] .. shard)
end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
