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
-- KEYS[2]  the shard's todo set (keys.todo)
-- KEYS[3..9] the batch's lapsed, owner, status, leases, costres, attempts, history (store.py's _REQUEUE_SUBKEYS)
-- ARGV[1]  owner string (token|shard) of the runner
-- ARGV[2]  shard number
-- ARGV     then quints: custom_id, delay in ms, counts as attempt (1/0), history record JSON ('' for none),
--          maybe paid (1/0)
-- Returns  {requeued, earliest due ms or ''}
local b = KEYS[1]
local k = {lapsed = KEYS[3], owner = KEYS[4], status = KEYS[5], leases = KEYS[6], costres = KEYS[7], attempts = KEYS[8], history = KEYS[9]}
local owner, shard = ARGV[1], ARGV[2]
local now = now_whole_ms()
local n, earliest = 0, nil
local cancelled = redis.call('HGET', b, 'state') == 'cancelled'
for i = 3, #ARGV, 5 do
  local cid = ARGV[i]
  local lapsed = redis.call('HGET', k.lapsed, owner .. ' ' .. cid)
  if lapsed then
    redis.call('HDEL', k.lapsed, owner .. ' ' .. cid)
    if ARGV[i + 4] ~= '1' then redis.call('HINCRBYFLOAT', b, 'cost_unknown', -tonumber(lapsed)) end
  end
  if redis.call('HGET', k.owner, cid) == owner
      and redis.call('HEXISTS', k.status, cid) == 0 then
    local due = now + tonumber(ARGV[i + 1])
    redis.call('ZREM', k.leases, cid)
    redis.call('HDEL', k.owner, cid)
    local held = redis.call('HGET', k.costres, cid)
    if held then
      redis.call('HDEL', k.costres, cid)
      redis.call('HINCRBYFLOAT', b, 'cost_reserved', -tonumber(held))
      if ARGV[i + 4] == '1' then redis.call('HINCRBYFLOAT', b, 'cost_unknown', tonumber(held)) end
    end
    if not cancelled then
      if ARGV[i + 2] == '1' then
        redis.call('HINCRBY', k.attempts, cid, 1)
        redis.call('HINCRBY', b, 'retries', 1)
      end
      if ARGV[i + 3] ~= '' then
        local h = redis.call('HGET', k.history, cid)
        if h then h = h .. '\n' .. ARGV[i + 3] else h = ARGV[i + 3] end
        redis.call('HSET', k.history, cid, h)
      end
      redis.call('ZADD', KEYS[2], due, cid)
      n = n + 1
      if not earliest or due < earliest then earliest = due end
    end
  end
end
return {n, earliest and tostring(earliest) or ''}
