-- complete: record the final outcome of jobs; the first outcome for a
-- custom_id wins, so a job ends exactly once even if two runners sent it.
-- KEYS[1]  batch key
-- It also adds each answer's real cost (a duplicate was paid for too) and
-- releases the worst case set aside for the job under --max-cost.
-- KEYS[1]  batch key
-- KEYS[2]  set of active batch ids
-- KEYS[3]  set of batches that ended and whose keys need an expiry
-- ARGV[1]  batch id
-- ARGV     then quads: kind ('R' result, 'E' error), custom_id, output line JSON, cost in USD
-- Returns  {results recorded, errors recorded, duplicates dropped}
local b = KEYS[1]
local cids, kinds, lines = {}, {}, {}
local cost = 0
for i = 2, #ARGV, 4 do
  kinds[#kinds + 1] = ARGV[i]
  cids[#cids + 1] = ARGV[i + 1]
  lines[#lines + 1] = ARGV[i + 2]
  cost = cost + (tonumber(ARGV[i + 3]) or 0)
end
if #cids == 0 then return {0, 0, 0} end
if redis.call('EXISTS', b) == 0 then return {0, 0, #cids} end  -- purged: nothing to record
if cost > 0 then redis.call('HINCRBYFLOAT', b, 'cost', cost) end
local held = redis.call('HMGET', b .. ':costres', unpack(cids))
local release, freed, once = {}, 0, {}
for i, v in ipairs(held) do
  if v and not once[cids[i]] then
    once[cids[i]] = true
    release[#release + 1] = cids[i]
    freed = freed + tonumber(v)
  end
end
if #release > 0 then
  redis.call('HDEL', b .. ':costres', unpack(release))
  redis.call('HINCRBYFLOAT', b, 'cost_reserved', -freed)
end
local status = redis.call('HMGET', b .. ':status', unpack(cids))
local new, hset, push = {}, {}, {}
local nr, ne, dup = 0, 0, 0
local taken = {}
for i, cid in ipairs(cids) do
  if status[i] or taken[cid] then
    dup = dup + 1
  else
    taken[cid] = true
    new[#new + 1] = cid
    hset[#hset + 1] = cid
    hset[#hset + 1] = kinds[i]
    push[#push + 1] = kinds[i] .. lines[i]
    if kinds[i] == 'R' then nr = nr + 1 else ne = ne + 1 end
  end
end
if #new > 0 then
  redis.call('HSET', b .. ':status', unpack(hset))
  redis.call('RPUSH', b .. ':results', unpack(push))
  redis.call('ZREM', b .. ':leases', unpack(new))
  redis.call('HDEL', b .. ':owner', unpack(new))
  redis.call('HDEL', b .. ':req', unpack(new))
  if nr > 0 then redis.call('HINCRBY', b, 'done', nr) end
  if ne > 0 then redis.call('HINCRBY', b, 'failed', ne) end
  local f = redis.call('HMGET', b, 'total', 'done', 'failed', 'state')
  if tonumber(f[2] or 0) + tonumber(f[3] or 0) >= tonumber(f[1] or 0) and f[4] ~= 'cancelled' then
    local t = redis.call('TIME')
    redis.call('HSET', b, 'state', 'finished', 'finished_at', t[1])
    redis.call('SREM', KEYS[2], ARGV[1])
    redis.call('SADD', KEYS[3], ARGV[1])
  end
end
return {nr, ne, dup}
