-- reserve: take capacity for requests from a shared requests/tokens-per-minute
-- budget. Buckets refill continuously at limit/60 per second up to their burst
-- capacity. A reservation is always granted, in arrival order, and may run the
-- bucket into debt: the caller waits until the debt it adds is paid off. That
-- serves waiters first come first served (a large request is not starved by
-- small ones) without anybody polling Redis.
-- KEYS[1]  budget hash (fields: req, tok, ts)
-- ARGV[1]  requests per minute (0: no limit)
-- ARGV[2]  tokens per minute (0: no limit)
-- ARGV[3]  burst capacity in seconds' worth of the limit (60: a full minute)
-- ARGV     then the token cost of each request, in order
-- Returns  for each request the wait in ms before it may be sent, or -1 if it
--          can never fit (its cost is above the bucket's capacity).
local rpm, tpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap_r, cap_t = rpm * burst / 60, tpm * burst / 60
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local s = redis.call('HMGET', KEYS[1], 'req', 'tok', 'ts')
local req, tok, ts = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
if not ts then
  req, tok, ts = cap_r, cap_t, now
end
local elapsed = math.max(0, now - ts)
req = math.min(cap_r, req + elapsed * rpm / 60000)
tok = math.min(cap_t, tok + elapsed * tpm / 60000)
local waits = {}
for i = 4, #ARGV do
  local cost = tonumber(ARGV[i])
  if tpm > 0 and cost > cap_t then
    waits[#waits + 1] = -1
  else
    local w = 0
    if rpm > 0 then
      req = req - 1
      if req < 0 then w = math.max(w, -req * 60000 / rpm) end
    end
    if tpm > 0 then
      tok = tok - cost
      if tok < 0 then w = math.max(w, -tok * 60000 / tpm) end
    end
    waits[#waits + 1] = math.ceil(w)
  end
end
redis.call('HSET', KEYS[1], 'req', tostring(req), 'tok', tostring(tok), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 3600000)
return waits
