-- renew: extend the leases a live runner still holds.
-- KEYS[1]  batch key
-- ARGV[1]  owner string (token|shard)
-- ARGV[2]  lease length in ms
-- ARGV     then custom_ids
-- Returns  how many leases were extended (others were lost to reclaim or finished)
local b = KEYS[1]
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  if redis.call('HGET', b .. ':owner', ARGV[i]) == ARGV[1] then
    redis.call('ZADD', b .. ':leases', 'XX', expiry, ARGV[i])
    n = n + 1
  end
end
return n
