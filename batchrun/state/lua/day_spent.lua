-- day_spent: the server's own per-day 429 (RPD/TPD) recorded beside the day's counts, as
-- day_take.lua records a day it counted spent (the fields are day_take.lua's).
-- KEYS[1]  the day's counts of the budget (keys.day_counts)
-- ARGV[1]  ms the server asks to wait
-- ARGV[2]  'rpd', 'tpd' or '' (the 429 did not say)
-- ARGV[3]  the limit the server named (0: it did not)
-- ARGV[4]  the endpoint's name
-- Returns  ms until the endpoint takes the model again (a later record already there stays)
local now = now_whole_ms()
local until_ms = now + math.max(0, tonumber(ARGV[1]))
local old = tonumber(redis.call('HGET', KEYS[1], 'spent_until') or 0) or 0
if old >= until_ms then return old - now end
redis.call('HSET', KEYS[1], 'spent_until', until_ms, 'spent_limit', ARGV[2], 'spent_of', ARGV[3],
           'spent_by', 'server', 'endpoint', ARGV[4])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < until_ms - now + 3600000 then redis.call('PEXPIRE', KEYS[1], until_ms - now + 3600000) end
return until_ms - now
