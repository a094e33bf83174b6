-- set_priority: a batch's priority (policy/fairshare.py), for its runners to pick up.
-- KEYS[1]  batch hash
-- ARGV[1]  the priority as stored ("high", "normal", "low" or a weight)
-- Returns  the priority it had ('' for none: normal), or false if there is no such batch
if redis.call('HEXISTS', KEYS[1], 'created') == 0 then return false end
local old = redis.call('HGET', KEYS[1], 'priority') or ''
redis.call('HSET', KEYS[1], 'priority', ARGV[1])
return old
