-- lease: take up to N jobs of a shard whose due time has come, as leases that
-- expire unless renewed (a worker that dies gives its jobs back this way).
-- KEYS[1]  batch key
-- KEYS[2]  the shard's todo set (keys.todo)
-- KEYS[3..7] the batch's status, leases, owner, req, attempts (store.py's _LEASE_SUBKEYS)
-- ARGV[1]  shard number
-- ARGV[2]  how many jobs at most
-- ARGV[3]  lease length in ms
-- ARGV[4]  owner token (the runner's id)
-- Returns  {state, next_due_ms or '', now_ms, max_cost, cid, attempts, request JSON, cid, ...}
--          next_due_ms is the earliest due time still in the shard's todo set
--          after this lease, '' when the set is empty; now_ms is Redis server time;
--          max_cost is the batch's spending cap now ('0': none), so runners see a new one.
local b = KEYS[1]
local k = {status = KEYS[3], leases = KEYS[4], owner = KEYS[5], req = KEYS[6], attempts = KEYS[7]}
local f = redis.call('HMGET', b, 'state', 'max_cost')
local state, cap = f[1], f[2] or '0'
local now = now_whole_ms()
if state ~= 'running' then
  return {state or 'missing', '', tostring(now), cap}
end
local todo = KEYS[2]
local out = {state, '', tostring(now), cap}
local cids = redis.call('ZRANGEBYSCORE', todo, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #cids > 0 then
  redis.call('ZREM', todo, unpack(cids))
  -- A job finished by a runner whose lease had lapsed may still sit in todo:
  -- never send it again.
  local status = redis.call('HMGET', k.status, unpack(cids))
  local live = {}
  for i, cid in ipairs(cids) do
    if not status[i] then live[#live + 1] = cid end
  end
  if #live > 0 then
    local expiry = now + tonumber(ARGV[3])
    local owner = ARGV[4] .. '|' .. ARGV[1]
    local zargs, hargs = {}, {}
    for _, cid in ipairs(live) do
      zargs[#zargs + 1] = expiry
      zargs[#zargs + 1] = cid
      hargs[#hargs + 1] = cid
      hargs[#hargs + 1] = owner
    end
    redis.call('ZADD', k.leases, unpack(zargs))
    redis.call('HSET', k.owner, unpack(hargs))
    local reqs = redis.call('HMGET', k.req, unpack(live))
    local atts = redis.call('HMGET', k.attempts, unpack(live))
    for i, cid in ipairs(live) do
      out[#out + 1] = cid
      out[#out + 1] = atts[i] or '0'
      out[#out + 1] = reqs[i] or ''
    end
  end
end
local first = redis.call('ZRANGE', todo, 0, 0, 'WITHSCORES')
if #first > 0 then out[2] = first[2] end
return out
