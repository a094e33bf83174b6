-- slot_release: give back slots of an endpoint's max_in_flight (the requests were answered).
-- KEYS[1]  the endpoint's slots (zset member -> lease expiry ms)
-- ARGV     the members given back
-- Returns  how many were still held (a lapsed lease was already taken back)
local n = 0
for i = 1, #ARGV do n = n + redis.call('ZREM', KEYS[1], ARGV[i]) end
return n
