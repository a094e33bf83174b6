-- remote_save: write remote-batch part records, only while the caller holds the batch's remote
-- lock: a runner that lost it (it stalled past the lock's length) cannot overwrite the state a
-- newer runner keeps, so a remote batch is never recorded twice.
-- KEYS[1]  the batch's remote lock (keys.sub(batch, 'rlock'))
-- KEYS[2]  part number -> part record JSON (keys.sub(batch, 'rparts'))
-- KEYS[3]  part number -> its custom_ids, one a line (keys.sub(batch, 'rids'))
-- ARGV[1]  the caller's token
-- ARGV     then triples: part number, record JSON, custom_ids ('' leaves them as they are)
-- Returns  1 if written, 0 if the caller does not hold the lock
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '' then redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2]) end
end
return 1
