-- renew: extend the leases a live runner still holds.
-- KEYS[1]  the batch's lease owners (custom_id -> owner string)
-- KEYS[2]  the batch's leases (custom_id -> expiry ms)
-- ARGV[1]  owner string (token|shard)
-- ARGV[2]  lease length in ms
-- ARGV     then custom_ids
-- Returns  how many leases were extended (others were lost to reclaim or finished)
local owners, leases = KEYS[1], KEYS[2]
local expiry = now_whole_ms() + tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  if redis.call('HGET', owners, ARGV[i]) == ARGV[1] then
    redis.call('ZADD', leases, 'XX', expiry, ARGV[i])
    n = n + 1
  end
end
return n
