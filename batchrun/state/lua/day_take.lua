-- day_take: count one request against an endpoint's per-day limits (rpd, tpd) for a model.
-- The day is the UTC day on Redis server time; its counts start again at midnight UTC.
-- KEYS[1]  the day's counts (hash: day, req, tok), beside the budget it belongs to; when the day
--          is spent, also its record (policy/days.py): spent_until (server ms), spent_limit
--          ('rpd' or 'tpd'), spent_of (the limit), spent_by ('count', or 'server' from
--          day_spent.lua), endpoint (its name)
-- ARGV[1]  requests per day (0: no limit)
-- ARGV[2]  tokens per day (0: no limit)
-- ARGV[3]  tokens this request is charged
-- ARGV[4]  the endpoint's name (for the record)
-- Returns  {0, the day counted on, '', 0} when counted (day_give_back.lua takes it back if unsent),
--          or {1, ms until it may be asked again, 'rpd' or 'tpd', tokens left} when the day's
--          limit cannot take it (nothing is counted then), or when the server's own per-day 429
--          is still in force. Tokens left is -1 when the day is spent (its requests, the server's
--          429, or fewer tokens left than today's average request: the record says until when);
--          else the day still takes requests smaller than this one, which alone is refused
--          (no record: the endpoint is not spent, only too small today for this request)
local now = now_whole_ms()
local day = math.floor(now / 86400000)
local rpd, tpd, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'day', 'req', 'tok', 'spent_until', 'spent_by', 'spent_limit')
local until_ms = tonumber(s[4] or 0) or 0
if s[5] == 'server' and until_ms > now then
  return {1, until_ms - now, s[6] or '', -1}
end
local req, tok = 0, 0
if tonumber(s[1] or -1) == day then req, tok = tonumber(s[2] or 0), tonumber(s[3] or 0) end
local reset_at = (day + 1) * 86400000
if (rpd > 0 and req + 1 > rpd) or (tpd > 0 and tok + tokens > tpd) then
  local which = (rpd > 0 and req + 1 > rpd) and 'rpd' or 'tpd'
  local left = tpd - tok
  if which == 'tpd' and req > 0 and left >= tok / req then
    return {1, reset_at - now, which, left}  -- room for today's average request: only this one is too large
  end
  redis.call('HSET', KEYS[1], 'spent_until', reset_at, 'spent_limit', which,
             'spent_of', which == 'rpd' and rpd or tpd, 'spent_by', 'count', 'endpoint', ARGV[4] or '')
  redis.call('PEXPIRE', KEYS[1], reset_at - now + 3600000)
  return {1, reset_at - now, which, -1}
end
redis.call('HSET', KEYS[1], 'day', day, 'req', req + 1, 'tok', tok + tokens)
if s[4] then  -- a record no longer true: a smaller request fits today's tokens, or a new day began
  redis.call('HDEL', KEYS[1], 'spent_until', 'spent_limit', 'spent_of', 'spent_by', 'endpoint')
end
redis.call('PEXPIRE', KEYS[1], reset_at - now + 3600000)
return {0, day, '', 0}
