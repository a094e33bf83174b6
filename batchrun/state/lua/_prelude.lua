-- _prelude: scripts.py puts this before every script, so that each has these helpers
-- without a copy of its own. Scripts read the clock from Redis TIME, so that runners
-- on machines with skewed clocks agree.
local function server_time()  -- seconds, microseconds
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[2])
end
local function now_ms()  -- ms, with the microseconds as a fraction
  local sec, usec = server_time()
  return sec * 1000 + usec / 1000
end
local function now_whole_ms()  -- ms, the microseconds dropped
  local sec, usec = server_time()
  return sec * 1000 + math.floor(usec / 1000)
end
-- Dollars for a sentence, with enough digits that a tiny sum does not read as $0.0000.
local function usd(x)
  if x > 0 and x < 0.0001 then  -- (math.log10 is gone after Lua 5.1, which fakeredis may not be)
    return string.format('$%.' .. (1 - math.floor(math.log(x) / math.log(10))) .. 'f', x)
  end
  return string.format('$%.4f', x)
end
