-- set_state: move a batch to a new state, optionally only from given states,
-- so that e.g. a pause cannot overwrite a batch that just finished.
-- KEYS[1]  batch key
-- KEYS[2]  set of active batch ids
-- KEYS[3]  set of batches that ended and whose keys need an expiry
-- ARGV[1]  batch id
-- ARGV[2]  new state
-- ARGV[3]  reason ('' for none)
-- ARGV[4]  pause kind (states.PauseKind; '' for none): replaces the one before
-- ARGV     then the states it may move from (none: any)
-- Returns  1 if the state changed, 0 if not
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
if #ARGV > 4 then
  local allowed = false
  for i = 5, #ARGV do
    if ARGV[i] == cur then allowed = true end
  end
  if not allowed then return 0 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'reason', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'pause_kind', ARGV[4])
else
  redis.call('HDEL', KEYS[1], 'pause_kind')
end
if ARGV[2] == 'running' and cur ~= 'running' then
  -- a resumed batch gives an unreachable server a full --give-up-after again
  redis.call('HSET', KEYS[1], 'running_since', tostring(now_whole_ms()))
end
if ARGV[2] == 'running' or ARGV[2] == 'paused' then
  redis.call('SADD', KEYS[2], ARGV[1])
elseif ARGV[2] == 'finished' or ARGV[2] == 'cancelled' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('SADD', KEYS[3], ARGV[1])
end
return 1
