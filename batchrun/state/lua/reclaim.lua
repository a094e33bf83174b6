-- reclaim: put jobs whose lease expired (their worker died or hung) back in
-- their shard's todo set, due at once, and park the shard so a runner starts.
-- No attempt is counted: the job did not fail, its worker did. The worst case
-- set aside for it under --max-cost is counted as spent ('cost_unknown'): its
-- request may have been paid for, and nobody will report what it cost. The
-- lapsed attempt is noted in ':lapsed' ("owner custom_id" -> that worst case):
-- if its runner was only cut off and reports after all, complete or requeue
-- replace the worst case by what it really cost, so it counts once.
-- KEYS[1]  batch key
-- KEYS[2]  parked shards (sorted set "batch_id:shard" -> due ms)
-- ARGV[1]  batch id
-- ARGV[2]  how many at most
-- Returns  how many jobs were reclaimed
local b = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', b .. ':leases', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for _, cid in ipairs(expired) do
  local owner = redis.call('HGET', b .. ':owner', cid)
  redis.call('ZREM', b .. ':leases', cid)
  redis.call('HDEL', b .. ':owner', cid)
  local held = redis.call('HGET', b .. ':costres', cid)
  if held then
    redis.call('HDEL', b .. ':costres', cid)
    redis.call('HINCRBYFLOAT', b, 'cost_reserved', -tonumber(held))
    redis.call('HINCRBYFLOAT', b, 'cost_unknown', tonumber(held))
  end
  if owner then  -- added to: a runner that leased the job back may lapse again
    redis.call('HINCRBYFLOAT', b .. ':lapsed', owner .. ' ' .. cid, held or 0)
  end
  if owner and redis.call('HEXISTS', b .. ':status', cid) == 0 then
    local shard = string.match(owner, '|(%d+)$')
    if shard then
      redis.call('ZADD', b .. ':todo:' .. shard, now, cid)
      redis.call('ZADD', KEYS[2], now, ARGV[1] .. ':' .. shard)
      n = n + 1
    end
  end
end
return n
