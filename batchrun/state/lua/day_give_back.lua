-- day_give_back: a request day_take.lua counted but never sent (the batch paused or stopped while
-- it waited for its turn, its endpoint went down, it can never fit) gives its count back, and
-- with it the room a spent day's record (spent_by 'count') said was gone.
-- KEYS[1]  the day's counts (keys.day_counts)
-- ARGV[1]  the day (UTC day number on Redis time) it was counted on
-- ARGV[2]  the tokens it was counted
-- Returns  1 when given back, 0 when that day is over (a new day's counts are not touched)
local s = redis.call('HMGET', KEYS[1], 'day', 'req', 'tok', 'spent_by')
if tonumber(s[1] or -1) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'req', math.max(0, tonumber(s[2] or 0) - 1),
           'tok', math.max(0, tonumber(s[3] or 0) - tonumber(ARGV[2])))
if s[4] == 'count' then
  redis.call('HDEL', KEYS[1], 'spent_until', 'spent_limit', 'spent_of', 'spent_by', 'endpoint')
end
return 1
