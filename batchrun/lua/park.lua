-- park: note that a shard needs a runner at a due time (its remaining jobs
-- wait for backoff), keeping the earliest due time if already parked.
-- KEYS[1]  parked shards (sorted set "batch_id:shard" -> due ms)
-- ARGV[1]  member "batch_id:shard"
-- ARGV[2]  due time in ms (Redis server time); '' for now
-- Returns  1
local due = ARGV[2]
if due == '' then
  local t = redis.call('TIME')
  due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  due = tonumber(due)
end
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not old or due < tonumber(old) then
  redis.call('ZADD', KEYS[1], due, ARGV[1])
end
return 1
