-- finish_ended: finish a running batch whose jobs have all ended (a submit that added nothing to
-- send: a rerun the response cache answered whole, or a file submitted again), judged on the
-- counts as they are now, in one step: another submit adding jobs to the batch meanwhile must not
-- see it finished with jobs left, as complete.lua judges its own end. A batch that ran again
-- gets a new 'finished_at'.
-- KEYS[1]  batch key
-- KEYS[2]  set of active batch ids
-- KEYS[3]  set of batches that ended and whose keys need an expiry
-- ARGV[1]  batch id
-- Returns  1 if it finished now, 0 if not (jobs left, or not running)
local b = KEYS[1]
local f = redis.call('HMGET', b, 'total', 'done', 'failed', 'state')
if f[4] ~= 'running' then return 0 end
if tonumber(f[2] or 0) + tonumber(f[3] or 0) < tonumber(f[1] or 0) then return 0 end
redis.call('HSET', b, 'state', 'finished', 'reason', '', 'finished_at', tostring((server_time())))
redis.call('HDEL', b, 'pause_kind')
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
