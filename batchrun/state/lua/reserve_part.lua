-- reserve_part: before a remote batch's file is uploaded (--via batch-api or auto), set aside
-- the worst case of each of its jobs (at the Batch API price) against the batch's --max-cost,
-- all of them or none, the same cap live requests draw on (reserve_cost.lua): spent + set
-- aside + this part must stay within it. A part that does not fit pauses the batch with the
-- live cap's sentence and kind ('cost_cap'), and is not uploaded. The jobs' amounts go into
-- the same per-job hash live requests use, so complete.lua settles each to its real cost and
-- requeue.lua gives back the amount of a line sent again live. Written only by the holder of
-- the batch's remote lock, with the part's record in the same step (a runner killed between
-- the two would otherwise set it aside twice; a job already set aside counts once anyway).
-- KEYS[1]  batch key
-- KEYS[2]  the batch's lease owners (custom_id -> owner string)
-- KEYS[3]  the batch's cost set aside per job (custom_id -> worst-case USD)
-- KEYS[4]  the batch's remote lock
-- KEYS[5]  part number -> part record JSON
-- ARGV[1]  batch id
-- ARGV[2]  the caller's lock token
-- ARGV[3]  part number
-- ARGV[4]  the part's record JSON once reserved
-- ARGV[5]  the part as the sentence names it ('remote batch #3, 40 jobs')
-- ARGV     then pairs: custom_id, worst-case cost in USD
-- Returns  {1 reserved, 0 not (the batch is not running, or the cap refused it: then the
--           reason), -1 the caller lost the lock; the reason or ''}
local b, owners, costres = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', KEYS[4]) ~= ARGV[2] then return {-1, ''} end
local f = redis.call('HMGET', b, 'max_cost', 'cost', 'cost_reserved', 'cost_unknown', 'state')
if f[5] ~= 'running' then return {0, ''} end
local cap = tonumber(f[1] or '0') or 0
local spent = tonumber(f[2] or '0') or 0
local reserved = tonumber(f[3] or '0') or 0
local unknown = tonumber(f[4] or '0') or 0
local new = {}
local added = 0
for i = 6, #ARGV, 2 do
  local cid, worst = ARGV[i], tonumber(ARGV[i + 1])
  local owner = redis.call('HGET', owners, cid)
  if owner and string.sub(owner, 1, 7) == 'remote|' and redis.call('HEXISTS', costres, cid) == 0 then
    new[#new + 1] = i
    added = added + worst
  end
end
if cap > 0 and spent + unknown + reserved + added > cap then
  local reason = string.format(
    'the next %s (up to %s at the Batch API price) would take the batch past its --max-cost of %s ' ..
    '(%s spent, %s set aside for requests in flight and remote batches%s); raise the cap with: ' ..
    'batchrun resume %s --max-cost USD',
    ARGV[5], usd(added), usd(cap), usd(spent), usd(reserved),
    unknown > 0 and string.format(', %s counted for requests whose worker died', usd(unknown)) or '',
    ARGV[1])
  redis.call('HSET', b, 'state', 'paused', 'reason', reason, 'pause_kind', 'cost_cap')
  return {0, reason}
end
for _, i in ipairs(new) do redis.call('HSET', costres, ARGV[i], ARGV[i + 1]) end
if added > 0 then redis.call('HINCRBYFLOAT', b, 'cost_reserved', added) end
redis.call('HSET', KEYS[5], ARGV[3], ARGV[4])
return {1, ''}
