-- complete: record the final outcome of jobs; the first outcome for a
-- custom_id wins, so a job ends exactly once even if two runners sent it.
-- Cost counts once per attempt. An outcome adds its real cost only if its
-- caller answers for that attempt: it holds the job's lease, or it held the
-- lease when it lapsed (reclaim noted that in ':lapsed' and counted the
-- attempt's worst case as unknown, which the real cost now replaces). So a
-- retried call whose first run did land, or a second report of one attempt,
-- adds nothing, while a duplicate sent by another runner adds what it cost.
-- Only the lease's holder releases the worst case set aside for the job (a
-- late answer must not free what a live attempt holds); an error whose attempt
-- may have been paid (it gave up after a timeout) counts that worst case as
-- unknown instead, as requeue does. The first outcome also
-- removes the job from its shard's todo set, where a reclaim may have put it.
-- KEYS[1]  batch key
-- KEYS[2]  set of active batch ids
-- KEYS[3]  set of batches that ended and whose keys need an expiry
-- KEYS[4..10] the batch's status, owner, lapsed, costres, leases, results, req (store.py's _COMPLETE_SUBKEYS)
-- KEYS[11] the calling runner's shard's todo set (keys.todo), absent for a caller without a shard
-- ARGV[1]  batch id
-- ARGV[2]  owner string (token|shard) of the calling runner; '' for a caller
--          without leases (tools, tests), which answers for first outcomes only
-- ARGV     then quints: kind ('R' result, 'E' error), custom_id, output line JSON, cost in USD,
--          maybe paid (1/0: no answer, yet the request may have been processed; 'C': a result
--          from the response cache, which cost nothing: its cost field is what it saved, counted
--          in 'cache_hits' and 'cache_saved' of its first outcome, not in 'cost')
-- Returns  {results recorded, errors recorded, duplicates dropped}
local b = KEYS[1]
local k = {status = KEYS[4], owner = KEYS[5], lapsed = KEYS[6], costres = KEYS[7], leases = KEYS[8], results = KEYS[9], req = KEYS[10]}
local owner = ARGV[2]
if #ARGV < 3 then return {0, 0, 0} end
if redis.call('EXISTS', b) == 0 then return {0, 0, (#ARGV - 2) / 5} end  -- purged: nothing to record
local todo = KEYS[11]
local cost, freed, back, unknown = 0, 0, 0, 0
local nr, ne, dup, hits, saved = 0, 0, 0, 0, 0
local taken = {}
for i = 3, #ARGV, 5 do
  local kind, cid, paid, cached = ARGV[i], ARGV[i + 1], ARGV[i + 4] == '1', ARGV[i + 4] == 'C'
  local first = not taken[cid] and redis.call('HEXISTS', k.status, cid) == 0
  local mine, lapsed
  if owner == '' then
    mine = first
  else
    mine = redis.call('HGET', k.owner, cid) == owner
    lapsed = redis.call('HGET', k.lapsed, owner .. ' ' .. cid)
  end
  if lapsed then
    redis.call('HDEL', k.lapsed, owner .. ' ' .. cid)
    if not paid then back = back + tonumber(lapsed) end
  end
  if mine then
    local held = redis.call('HGET', k.costres, cid)
    if held then
      redis.call('HDEL', k.costres, cid)
      freed = freed + tonumber(held)
      if paid then unknown = unknown + tonumber(held) end
    end
    redis.call('ZREM', k.leases, cid)
    redis.call('HDEL', k.owner, cid)
  end
  if (mine or lapsed) and not cached then cost = cost + (tonumber(ARGV[i + 3]) or 0) end
  if first and cached then hits = hits + 1; saved = saved + (tonumber(ARGV[i + 3]) or 0) end
  if first then
    taken[cid] = true
    redis.call('HSET', k.status, cid, kind)
    redis.call('RPUSH', k.results, kind .. ARGV[i + 2])
    redis.call('HDEL', k.req, cid)
    if todo then redis.call('ZREM', todo, cid) end
    if kind == 'R' then nr = nr + 1 else ne = ne + 1 end
  else
    dup = dup + 1
  end
end
if cost > 0 then redis.call('HINCRBYFLOAT', b, 'cost', cost) end
if freed > 0 then redis.call('HINCRBYFLOAT', b, 'cost_reserved', -freed) end
if unknown - back ~= 0 then redis.call('HINCRBYFLOAT', b, 'cost_unknown', unknown - back) end
if hits > 0 then redis.call('HINCRBY', b, 'cache_hits', hits) end
if saved > 0 then redis.call('HINCRBYFLOAT', b, 'cache_saved', saved) end
if nr > 0 then redis.call('HINCRBY', b, 'done', nr) end
if ne > 0 then redis.call('HINCRBY', b, 'failed', ne) end
if nr + ne > 0 then
  local f = redis.call('HMGET', b, 'total', 'done', 'failed', 'state')
  if tonumber(f[2] or 0) + tonumber(f[3] or 0) >= tonumber(f[1] or 0) and f[4] ~= 'cancelled' then
    redis.call('HSET', b, 'state', 'finished', 'finished_at', tostring((server_time())))
    redis.call('SREM', KEYS[2], ARGV[1])
    redis.call('SADD', KEYS[3], ARGV[1])
  end
end
return {nr, ne, dup}
