-- _fairshare: the fair share of a budget between batches, for reserve.lua (scripts.py puts it
-- before reserve.lua, after the prelude). The rule is policy/fairshare.py's budget_shares.
--
-- Every granted reservation is queued here until it is due (the budget's level has reached its
-- mark), with how much it took. A batch may have at most its share of HORIZON_MS worth of the
-- budget queued: its weight over the weights of the batches active on the budget (queued, or
-- reserved in the last ACTIVE_MS). Since the queue drains first come first served, each batch
-- gets the budget in proportion to what it may queue, that is to its weight; alone, a batch may
-- queue all of it. A batch with nothing queued is always let in (a request bigger than its
-- share is not starved). A low batch (weight 0) may only fill what the others leave of the
-- horizon, unless no batch that is not low is active. The unit is tokens when the budget has a
-- token limit, else requests; with neither there is nothing to share.
-- KEYS (passed to fair_room): the fair-share hash (unit; q:BATCH queued, w:BATCH weight,
--   at:BATCH last reservation ms) and the queue (sorted set "mark|charge|batch" -> mark).
local HORIZON_MS = 2000
local ACTIVE_MS = 3000
local FORGET_MS = 60000
local fair_unit = nil

local function fair_forget(hash, queue, from, to)
  local gone = redis.call('ZRANGEBYSCORE', queue, from, to)
  for _, m in ipairs(gone) do
    local charge, batch = string.match(m, '^[^|]*|([^|]*)|(.*)$')
    if batch then
      local left = tonumber(redis.call('HINCRBYFLOAT', hash, 'q:' .. batch, -tonumber(charge)))
      if left < 0.5 then redis.call('HSET', hash, 'q:' .. batch, '0') end
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', queue, from, to) end
end

-- How much more `batch` may queue now (nil: no limit to share), and its rate in units per ms.
local function fair_room(hash, queue, batch, weight, now, rpm, tpm, line_t, spent_t, line_r, spent_r)
  local line, top, rate
  if tpm > 0 then
    fair_unit, line, top, rate = 't', line_t, spent_t, tpm / 60000
  elseif rpm > 0 then
    fair_unit, line, top, rate = 'r', line_r, spent_r, rpm / 60000
  else
    return nil, 0
  end
  if redis.call('HGET', hash, 'unit') ~= fair_unit then  -- a new budget, or a limit learnt since
    redis.call('DEL', hash, queue)
    redis.call('HSET', hash, 'unit', fair_unit)
  end
  fair_forget(hash, queue, '-inf', line)  -- due: no longer waiting
  fair_forget(hash, queue, '(' .. top, '+inf')  -- above what was ever taken: the budget was lost
  redis.call('HSET', hash, 'w:' .. batch, tostring(weight), 'at:' .. batch, tostring(now))
  local raw = redis.call('HGETALL', hash)
  local q, w, at = {}, {}, {}
  for i = 1, #raw, 2 do
    local kind, b = string.match(raw[i], '^(%a+):(.*)$')
    if kind == 'q' then q[b] = tonumber(raw[i + 1]) elseif kind == 'w' then w[b] = tonumber(raw[i + 1])
    elseif kind == 'at' then at[b] = tonumber(raw[i + 1]) end
  end
  local nonlow, lows, total = 0, 0, 0
  for b, seen in pairs(at) do
    local queued = q[b] or 0
    if queued > 0 or now - seen < ACTIVE_MS then
      if (w[b] or 1) > 0 then nonlow = nonlow + (w[b] or 1) else lows = lows + 1 end
      total = total + queued
    elseif now - seen > FORGET_MS then
      redis.call('HDEL', hash, 'q:' .. b, 'w:' .. b, 'at:' .. b)
    end
  end
  local horizon = math.max(1, HORIZON_MS * rate)
  local own = q[batch] or 0
  local room
  if weight > 0 then
    room = horizon * weight / nonlow - own
  elseif nonlow == 0 then
    room = horizon / lows - own
  else
    room = horizon - total  -- what the others leave
  end
  return room, rate
end

-- A reservation granted to `batch` (take()'s answer r): queued until due; the room left.
local function fair_queued(hash, queue, batch, r, room)
  local mark, charge = r[4], r[3]
  if fair_unit == 'r' then mark, charge = r[5], 1 end
  redis.call('ZADD', queue, mark, mark .. '|' .. charge .. '|' .. batch)
  redis.call('HINCRBYFLOAT', hash, 'q:' .. batch, charge)
  return room - charge
end

-- How long a batch over its share waits before asking again (ms): about until its queue is
-- back under its share, within [50 ms, 1 s].
local function fair_wait(room, rate)
  return math.floor(math.min(1000, math.max(50, -room / math.max(rate, 1e-9))))
end
