-- park: note that a shard needs a runner at a due time (its remaining jobs
-- wait for backoff), keeping the earliest due time if already parked.
-- With ARGV[3] = 'hold', a live runner instead pushes its shard's entry to
-- now + ARGV[2] ms: the entry is the runner's lease on its shard, due (and so
-- promoted to a new runner) if the runner dies without removing it.
-- KEYS[1]  parked shards (sorted set "batch_id:shard" -> due ms)
-- ARGV[1]  member "batch_id:shard"
-- ARGV[2]  due time in ms (Redis server time), '' for now; with 'hold': ms from now
-- ARGV[3]  'hold' or absent
-- Returns  1
if ARGV[3] == 'hold' then
  local now = now_whole_ms()
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
local due = ARGV[2]
if due == '' then
  due = now_whole_ms()
else
  due = tonumber(due)
end
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not old or due < tonumber(old) then
  redis.call('ZADD', KEYS[1], due, ARGV[1])
end
return 1
