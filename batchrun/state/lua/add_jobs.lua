-- add_jobs: add jobs to a batch unless the batch already knows them, so that
-- submitting the same file twice under one batch id adds nothing twice.
-- KEYS[1]  batch key (hash of batch fields)
-- KEYS[2]  the batch's status hash (custom_id -> 'R'/'E' once ended)
-- KEYS[3]  the batch's request hash (custom_id -> request JSON)
-- ARGV[1]  the prefix of its shards' todo sets (keys.todo_prefix: the shard number follows)
-- ARGV     then triples: custom_id, shard number, request JSON
-- Returns  {added, shard, shard, ...}: how many were new, and the shards that got new jobs.
-- The batch's 'shards' field becomes at least the highest shard number + 1.
local b, status, reqs, todo = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local added = 0
local shards, seen = {}, {}
local top = -1
for i = 2, #ARGV, 3 do
  local cid, shard = ARGV[i], ARGV[i + 1]
  top = math.max(top, tonumber(shard))
  if redis.call('HEXISTS', status, cid) == 0
      and redis.call('HSETNX', reqs, cid, ARGV[i + 2]) == 1 then
    redis.call('ZADD', todo .. shard, 0, cid)
    added = added + 1
    if not seen[shard] then
      seen[shard] = true
      shards[#shards + 1] = shard
    end
  end
end
if added > 0 then
  redis.call('HINCRBY', b, 'total', added)
end
if top + 1 > tonumber(redis.call('HGET', b, 'shards') or 0) then
  redis.call('HSET', b, 'shards', top + 1)
end
table.insert(shards, 1, added)
return shards
