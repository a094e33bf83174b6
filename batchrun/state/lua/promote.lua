-- promote: hand out parked shards whose due time has come. Each one handed out
-- stays parked, due again after ARGV[2] ms, until its runner starts and
-- removes it: a promoter that dies before enqueueing loses nothing.
-- KEYS[1]  parked shards (sorted set "batch_id:shard" -> due ms)
-- ARGV[1]  how many at most
-- ARGV[2]  ms before a handed-out shard is due again
-- Returns  the members handed out
local now = now_whole_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), m)
end
return due
