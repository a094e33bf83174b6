-- requeue: give leased jobs back to their shard's todo set with a due time,
-- counting a failed attempt and recording it in the job's history.
-- A runner whose lease lapsed (and was taken over) cannot requeue: the owner
-- must still match. The job's worst case set aside under --max-cost is
-- released: a refused or failed request costs nothing, except one that may have
-- been processed before it broke (a timeout, a broken stream), which is counted
-- at its worst case ('cost_unknown'). A cancelled batch takes nothing back.
-- An attempt whose lease lapsed (see reclaim) was counted at its worst case
-- already: that stays if it may have been paid, else it is taken back, whoever
-- holds the job now.
-- KEYS[1]  batch key
-- ARGV[1]  owner string (token|shard) of the runner
-- ARGV[2]  shard number
-- ARGV     then quints: custom_id, delay in ms, counts as attempt (1/0), history record JSON ('' for none),
--          maybe paid (1/0)
-- Returns  {requeued, earliest due ms or ''}
local b = KEYS[1]
local owner, shard = ARGV[1], ARGV[2]
local now = now_whole_ms()
local n, earliest = 0, nil
local cancelled = redis.call('HGET', b, 'state') == 'cancelled'
for i = 3, #ARGV, 5 do
  local cid = ARGV[i]
  local lapsed = redis.call('HGET', b .. ':lapsed', owner .. ' ' .. cid)
  if lapsed then
    redis.call('HDEL', b .. ':lapsed', owner .. ' ' .. cid)
    if ARGV[i + 4] ~= '1' then redis.call('HINCRBYFLOAT', b, 'cost_unknown', -tonumber(lapsed)) end
  end
  if redis.call('HGET', b .. ':owner', cid) == owner
      and redis.call('HEXISTS', b .. ':status', cid) == 0 then
    local due = now + tonumber(ARGV[i + 1])
    redis.call('ZREM', b .. ':leases', cid)
    redis.call('HDEL', b .. ':owner', cid)
    local held = redis.call('HGET', b .. ':costres', cid)
    if held then
      redis.call('HDEL', b .. ':costres', cid)
      redis.call('HINCRBYFLOAT', b, 'cost_reserved', -tonumber(held))
      if ARGV[i + 4] == '1' then redis.call('HINCRBYFLOAT', b, 'cost_unknown', tonumber(held)) end
    end
    if not cancelled then
      if ARGV[i + 2] == '1' then
        redis.call('HINCRBY', b .. ':attempts', cid, 1)
        redis.call('HINCRBY', b, 'retries', 1)
      end
      if ARGV[i + 3] ~= '' then
        local h = redis.call('HGET', b .. ':history', cid)
        if h then h = h .. '\n' .. ARGV[i + 3] else h = ARGV[i + 3] end
        redis.call('HSET', b .. ':history', cid, h)
      end
      redis.call('ZADD', b .. ':todo:' .. shard, due, cid)
      n = n + 1
      if not earliest or due < earliest then earliest = due end
    end
  end
end
return {n, earliest and tostring(earliest) or ''}
