-- slot_renew: extend the leases of slots a live runner still holds.
-- KEYS[1]  the endpoint's slots (zset member -> lease expiry ms)
-- ARGV[1]  lease length in ms
-- ARGV     then the members held
-- Returns  how many were extended (a member whose lease lapsed is not brought back: its slot
--          may be someone else's by now)
local now = now_whole_ms()
local expiry = now + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    n = n + 1
  end
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2) end
return n
