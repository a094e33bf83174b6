-- add_jobs: add jobs to a batch unless the batch already knows them, so that
-- submitting the same file twice under one batch id adds nothing twice.
-- KEYS[1]  batch key (hash of batch fields; job keys hang off it as KEYS[1]..':req' etc.)
-- ARGV     triples: custom_id, shard number, request JSON
-- Returns  {added, shard, shard, ...}: how many were new, and the shards that got new jobs.
-- The batch's 'shards' field becomes at least the highest shard number + 1.
local b = KEYS[1]
local added = 0
local shards, seen = {}, {}
local top = -1
for i = 1, #ARGV, 3 do
  local cid, shard = ARGV[i], ARGV[i + 1]
  top = math.max(top, tonumber(shard))
  if redis.call('HEXISTS', b .. ':status', cid) == 0
      and redis.call('HSETNX', b .. ':req', cid, ARGV[i + 2]) == 1 then
    redis.call('ZADD', b .. ':todo:' .. shard, 0, cid)
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
