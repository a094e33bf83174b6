-- settle: give back reservations the server never charged (a 429 refusal, a
-- request never sent), so the budget is not spent on them.
-- KEYS[1]  budget hash
-- ARGV[1]  requests to give back
-- ARGV[2]  tokens to give back (the charges reserve.lua returned)
-- ARGV[3]  input estimates to take off the calibration counter
-- ARGV[4]  output reservations to take off the calibration counter
-- Returns  1
local b = KEYS[1]
local s = redis.call('HMGET', b, 'req', 'tok', 's_in', 's_out')
if not s[1] then return 0 end  -- the budget expired: nothing to give back to
redis.call('HSET', b, 'req', tostring(tonumber(s[1]) + tonumber(ARGV[1])),
           'tok', tostring(tonumber(s[2]) + tonumber(ARGV[2])),
           's_in', tostring(math.max(0, tonumber(s[3] or 0) - tonumber(ARGV[3]))),
           's_out', tostring(math.max(0, tonumber(s[4] or 0) - tonumber(ARGV[4]))))
return 1
