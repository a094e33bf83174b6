-- serve_cached: end jobs with answers from the response cache as they are submitted (a rerun's
-- hits), so that they never enter a shard: each is recorded as a result in one step, as
-- complete.lua records a first outcome ('cached': no cost, counted in 'cache_hits' and
-- 'cache_saved'). A custom_id the batch knows already (ended, or still to send) is left as it
-- is, as add_jobs leaves it: a job ends once. The batch's end is not judged here: the submit
-- does it once the whole file has loaded (the misses are not all in yet).
-- KEYS[1]  batch key
-- KEYS[2]  the batch's status hash (custom_id -> 'R'/'E' once ended)
-- KEYS[3]  the batch's request hash (custom_id -> request JSON, until the job ends)
-- KEYS[4]  the batch's outcome list ('R'/'E' + output line)
-- ARGV     triples: custom_id, result line JSON, USD the answer saved
-- Returns  {jobs served, USD saved (as text)}
local b, status, reqs, results = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', b) == 0 then return {0, '0'} end  -- purged meanwhile
local ids = {}
for i = 1, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then return {0, '0'} end
local ended = redis.call('HMGET', status, unpack(ids))
local pending = redis.call('HMGET', reqs, unpack(ids))
local marks, lines, taken = {}, {}, {}
local saved = 0
for n = 1, #ids do
  local cid = ids[n]
  if not ended[n] and not pending[n] and not taken[cid] then
    taken[cid] = true
    marks[#marks + 1] = cid
    marks[#marks + 1] = 'R'
    lines[#lines + 1] = 'R' .. ARGV[3 * n - 1]
    saved = saved + (tonumber(ARGV[3 * n]) or 0)
  end
end
local served = #lines
if served == 0 then return {0, '0'} end
-- (in parts: unpack has a limit on the values it can pass)
local STEP = 1000
for i = 1, #marks, 2 * STEP do
  redis.call('HSET', status, unpack(marks, i, math.min(i + 2 * STEP - 1, #marks)))
end
for i = 1, served, STEP do
  redis.call('RPUSH', results, unpack(lines, i, math.min(i + STEP - 1, served)))
end
redis.call('HINCRBY', b, 'total', served)
redis.call('HINCRBY', b, 'done', served)
redis.call('HINCRBY', b, 'cache_hits', served)
if saved > 0 then redis.call('HINCRBYFLOAT', b, 'cache_saved', saved) end
return {served, tostring(saved)}
