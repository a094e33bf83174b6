-- settle: give back reservations the server never charged (a 429 refusal, a
-- request never sent), so the budget is not spent on them.
-- KEYS[1]  budget hash
-- ARGV[1]  requests to give back
-- ARGV[2]  tokens to give back (the charges reserve.lua returned)
-- Returns  1
local b = KEYS[1]
local s = redis.call('HMGET', b, 'req', 'tok')
if not s[1] then return 0 end  -- the budget expired: nothing to give back to
redis.call('HSET', b, 'req', tostring(tonumber(s[1]) + tonumber(ARGV[1])),
           'tok', tostring(tonumber(s[2]) + tonumber(ARGV[2])))
return 1
