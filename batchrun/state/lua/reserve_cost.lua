-- reserve_cost: before sending, set aside each job's worst-case cost against the
-- batch's --max-cost, so that spent + reserved never exceeds the cap. The first
-- job that would cross it pauses the batch; it and the jobs after it in this
-- call are refused (the runner gives them back without costing an attempt).
-- A job no longer leased by the caller is refused too (its lease lapsed, or it
-- was given back while this call waited), so nothing is set aside for it.
-- KEYS[1]  batch key
-- KEYS[2]  the batch's lease owners (custom_id -> owner string)
-- KEYS[3]  the batch's cost set aside per job (custom_id -> worst-case USD)
-- ARGV[1]  batch id
-- ARGV[2]  owner string (token|shard) of the calling runner
-- ARGV     then pairs: custom_id, worst-case cost in USD
-- Returns  {reason the batch was paused or '', then 1 (reserved) or 0 (refused) per pair}
-- A pause here writes pause_kind 'cost_cap' beside the reason (states.PauseKind): code
-- acts on the kind, people read the reason.
local b, owners, costres = KEYS[1], KEYS[2], KEYS[3]
local f = redis.call('HMGET', b, 'max_cost', 'cost', 'cost_reserved', 'cost_unknown', 'state')
local cap = tonumber(f[1] or '0') or 0
local spent = tonumber(f[2] or '0') or 0
local reserved = tonumber(f[3] or '0') or 0
local unknown = tonumber(f[4] or '0') or 0
local refused = f[5] ~= 'running'
local out = {''}
local added = 0
for i = 3, #ARGV, 2 do
  local cid, worst = ARGV[i], tonumber(ARGV[i + 1])
  if refused or redis.call('HGET', owners, cid) ~= ARGV[2] then
    out[#out + 1] = 0
  elseif redis.call('HEXISTS', costres, cid) == 1 then
    out[#out + 1] = 1  -- already set aside for this job
  elseif cap > 0 and spent + unknown + reserved + added + worst > cap then
    refused = true
    out[#out + 1] = 0
    out[1] = string.format(
      'the next job (%s, up to %s) would take the batch past its --max-cost of %s ' ..
      '(%s spent, %s set aside for requests in flight%s); raise the cap with: ' ..
      'batchrun resume %s --max-cost USD',
      cid, usd(worst), usd(cap), usd(spent), usd(reserved + added),
      unknown > 0 and string.format(', %s counted for requests whose worker died', usd(unknown)) or '',
      ARGV[1])
    redis.call('HSET', b, 'state', 'paused', 'reason', out[1], 'pause_kind', 'cost_cap')
  else
    redis.call('HSET', costres, cid, ARGV[i + 1])
    added = added + worst
    out[#out + 1] = 1
  end
end
if added > 0 then redis.call('HINCRBYFLOAT', b, 'cost_reserved', added) end
return out
