-- slot_acquire: take slots of an endpoint's fleet-wide max_in_flight, as leases.
-- A slot is a member of the endpoint's zset scored with its lease's expiry (server time):
-- a runner that dies stops renewing, and its slots come back when their leases run out.
-- KEYS[1]  the endpoint's slots (zset member -> lease expiry ms)
-- ARGV[1]  max_in_flight (slots in all)
-- ARGV[2]  lease length in ms
-- ARGV     then the members wanted (one per request, "runner-token:seq")
-- Returns  {slots taken (the first N members wanted got one), slots held now, ms until the soonest
--          lease runs out (0: none held)}
local now = now_whole_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local held = redis.call('ZCARD', KEYS[1])
local taken = 0
for i = 3, #ARGV do
  if held >= limit then break end
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  held = held + 1
  taken = taken + 1
end
if taken > 0 then redis.call('PEXPIRE', KEYS[1], lease * 2) end
local soonest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = soonest[2] and math.max(0, tonumber(soonest[2]) - now) or 0
return {taken, held, wait}
