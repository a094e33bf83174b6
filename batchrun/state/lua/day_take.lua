-- day_take: count one request against an endpoint's per-day limits (rpd, tpd) for a model.
-- The day is the UTC day on Redis server time; its counts start again at midnight UTC.
-- KEYS[1]  the day's counts (hash: day, req, tok), beside the budget it belongs to
-- ARGV[1]  requests per day (0: no limit)
-- ARGV[2]  tokens per day (0: no limit)
-- ARGV[3]  tokens this request is charged
-- Returns  {0, 0} when counted, or {1, ms until the day's counts start again} when the day's
--          limit cannot take it (nothing is counted then)
local now = now_whole_ms()
local day = math.floor(now / 86400000)
local rpd, tpd, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'day', 'req', 'tok')
local req, tok = 0, 0
if tonumber(s[1] or -1) == day then req, tok = tonumber(s[2] or 0), tonumber(s[3] or 0) end
local reset_in = (day + 1) * 86400000 - now
if (rpd > 0 and req + 1 > rpd) or (tpd > 0 and tok + tokens > tpd) then
  return {1, reset_in}
end
redis.call('HSET', KEYS[1], 'day', day, 'req', req + 1, 'tok', tok + tokens)
redis.call('PEXPIRE', KEYS[1], reset_in + 3600000)
return {0, 0}
