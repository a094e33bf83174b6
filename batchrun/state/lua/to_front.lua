-- to_front: move a queued RQ job to the front of its queue, where the next worker takes it
-- (the fair choice between batches, runner/fairturn.py). Nothing happens to a job another
-- worker took meanwhile: it is moved only if it is still queued.
-- KEYS[1]  the RQ queue (list of job ids; workers pop from the left)
-- ARGV[1]  job id
-- Returns  1 if moved, 0 if it was not queued
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
