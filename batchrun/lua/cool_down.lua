-- cool_down: a 429 said the budget is exhausted: stop the whole fleet sending
-- on it until the server's hint has passed, and empty the buckets so that
-- afterwards traffic comes back at the refill rate, not all at once.
-- KEYS[1]  budget hash
-- ARGV[1]  cooldown in ms (the server's wait hint)
-- Returns  the cooldown's end, ms (Redis server time)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local s = redis.call('HMGET', KEYS[1], 'cool_until', 'req', 'tok')
local cool_until = math.max(tonumber(s[1] or 0), now + tonumber(ARGV[1]))
local fields = {'cool_until', tostring(cool_until), 'ts', tostring(now)}
if tonumber(s[1] or 0) < now then
  fields[#fields + 1] = 'cool_next'
  fields[#fields + 1] = tostring(cool_until)
end
if s[2] and tonumber(s[2]) > 0 then
  fields[#fields + 1] = 'req'
  fields[#fields + 1] = '0'
end
if s[3] and tonumber(s[3]) > 0 then
  fields[#fields + 1] = 'tok'
  fields[#fields + 1] = '0'
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], 3600000)
return tostring(math.floor(cool_until))
