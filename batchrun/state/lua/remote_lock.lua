-- remote_lock: take, keep or give up a batch's remote-batch lock, so that one runner at a time
-- drives its remote batches (OpenAI Batch API) and a dead one's lock lapses by itself.
-- KEYS[1]  the batch's remote lock (keys.sub(batch, 'rlock'))
-- ARGV[1]  the caller's token
-- ARGV[2]  lock length in ms; '0' gives the lock up (if the caller holds it)
-- Returns  1 if the caller holds the lock now (or gave it up), 0 if another runner does
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 1
end
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
