-- release_held: runners report the reservations they hold but have not sent
-- yet (waiting for their turn). A runner that stopped reporting died: what it
-- held was never sent, so it goes back to the budget.
-- KEYS[1]  budget hash
-- KEYS[2]  held hash of that budget: runner token -> "requests|tokens|reported_ms|stale_ms"
--          (stale_ms: when that runner's report is stale, from its own report interval)
-- ARGV[1]  ms after which a report without stale_ms is stale
-- Returns  {requests, tokens} given back
local now = now_ms()
local entries = redis.call('HGETALL', KEYS[2])
local back_r, back_t = 0, 0
for i = 1, #entries, 2 do
  local r, tk, at, stale = string.match(entries[i + 1], '^([%d.]+)|([%d.]+)|([%d.]+)|?([%d.]*)$')
  if at and now - tonumber(at) > (tonumber(stale) or tonumber(ARGV[1])) then
    back_r = back_r + tonumber(r)
    back_t = back_t + tonumber(tk)
    redis.call('HDEL', KEYS[2], entries[i])
  end
end
if back_r > 0 or back_t > 0 then
  local s = redis.call('HMGET', KEYS[1], 'req', 'tok')
  if s[1] then
    redis.call('HSET', KEYS[1], 'req', tostring(tonumber(s[1]) + back_r), 'tok', tostring(tonumber(s[2]) + back_t))
  end
end
return {tostring(back_r), tostring(back_t)}
