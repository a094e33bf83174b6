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
-- KEYS[3..7] the batch's leases, lease owners, cost set aside, lapsed attempts, status
--          (store.py's _RECLAIM_SUBKEYS)
-- ARGV[1]  batch id
-- ARGV[2]  how many at most
-- ARGV[3]  the prefix of its shards' todo sets (keys.todo_prefix: the shard number follows)
-- ARGV[4]  the prefix of its shards' parked members (keys.parked_prefix)
-- Returns  how many jobs were reclaimed
local b = KEYS[1]
local leases, owners, costres, lapsed, status = KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local now = now_whole_ms()
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for _, cid in ipairs(expired) do
  local owner = redis.call('HGET', owners, cid)
  redis.call('ZREM', leases, cid)
  redis.call('HDEL', owners, cid)
  local held = redis.call('HGET', costres, cid)
  if held then
    redis.call('HDEL', costres, cid)
    redis.call('HINCRBYFLOAT', b, 'cost_reserved', -tonumber(held))
    redis.call('HINCRBYFLOAT', b, 'cost_unknown', tonumber(held))
  end
  if owner then  -- added to: a runner that leased the job back may lapse again
    redis.call('HINCRBYFLOAT', lapsed, owner .. ' ' .. cid, held or 0)
  end
  if owner and redis.call('HEXISTS', status, cid) == 0 then
    local shard = string.match(owner, '|(%d+)$')
    if shard then
      redis.call('ZADD', ARGV[3] .. shard, now, cid)
      redis.call('ZADD', KEYS[2], now, ARGV[4] .. shard)
      n = n + 1
    end
  end
end
return n
