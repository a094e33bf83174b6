-- reserve: the gate every request passes before it is sent. In one call it
--  * takes capacity from the shared requests/tokens-per-minute budget: buckets
--    refill continuously at limit/60 per second up to their burst capacity; a
--    reservation is granted in arrival order and may run the bucket into debt,
--    and the caller waits until its debt is paid off: first come first served
--    (a large request is not starved by small ones) and nobody polls Redis;
--  * honours the budget's cooldown (set by cool_down.lua after a 429): requests
--    reserved during it are released one `spacing` apart after it ends, so
--    traffic resumes gradually;
--  * honours the endpoint's circuit breaker (circuit.lua): while open nothing is
--    granted; once the cooling period is over exactly one request is let through
--    as a probe.
-- KEYS[1]  budget hash (req, tok, ts, cool_until, cool_next)
-- KEYS[2]  circuit hash of the endpoint (state, open_until, probe_until)
-- ARGV[1]  requests per minute (0: no limit)
-- ARGV[2]  tokens per minute (0: no limit)
-- ARGV[3]  burst capacity in seconds' worth of the limit (60: a full minute)
-- ARGV[4]  spacing in ms between requests released after a cooldown
-- ARGV     then the token cost of each request, in order
-- Returns  for each request two integers {ms, verdict}:
--          verdict 0: granted, send after ms;  2: granted as the circuit's probe;
--          1: not granted (circuit open), ask again after ms;  -1: can never fit.
local rpm, tpm, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local spacing = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
local cap_r, cap_t = rpm * burst / 60, tpm * burst / 60

-- The circuit first: an open circuit grants nothing and spends no budget.
local c = redis.call('HMGET', KEYS[2], 'state', 'open_until', 'probe_until')
local cstate, open_until, probe_until = c[1] or 'closed', tonumber(c[2] or 0), tonumber(c[3] or 0)
local probe_granted = false
if cstate == 'open' then
  for i = 5, #ARGV do
    local verdict, ms = 1, 0
    if tpm > 0 and tonumber(ARGV[i]) > cap_t then
      verdict = -1  -- can never fit: never the probe
    elseif now < open_until then
      ms = open_until - now
    elseif now >= probe_until and not probe_granted then
      probe_granted = true
      verdict = 2
      redis.call('HSET', KEYS[2], 'probe_until', tostring(now + 30000))
    else
      ms = 1000  -- a probe is out: ask again shortly
    end
    if verdict == 1 then
      out[#out + 1] = math.ceil(ms)
      out[#out + 1] = 1
    elseif verdict == -1 then
      out[#out + 1] = -1
      out[#out + 1] = -1
    else
      out[#out + 1] = -2  -- placeholder: the probe still takes budget below
      out[#out + 1] = 2
    end
  end
  if not probe_granted then return out end
end

local s = redis.call('HMGET', KEYS[1], 'req', 'tok', 'ts', 'cool_until', 'cool_next')
local req, tok, ts = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
local cool_until, cool_next = tonumber(s[4] or 0), tonumber(s[5] or 0)
-- A budget starts full; fields cool_down.lua wrote without them start full too.
req, tok, ts = req or cap_r, tok or cap_t, ts or now
local elapsed = math.max(0, now - ts)
req = math.min(cap_r, req + elapsed * rpm / 60000)
tok = math.min(cap_t, tok + elapsed * tpm / 60000)

local function take(cost)
  if tpm > 0 and cost > cap_t then return -1 end
  local w = 0
  if rpm > 0 then
    req = req - 1
    if req < 0 then w = math.max(w, -req * 60000 / rpm) end
  end
  if tpm > 0 then
    tok = tok - cost
    if tok < 0 then w = math.max(w, -tok * 60000 / tpm) end
  end
  if now < cool_until then
    -- Reserved during a cooldown: released one spacing apart after it.
    cool_next = math.max(cool_next, cool_until) + spacing
    w = math.max(w, cool_next - now)
  end
  return math.ceil(w)
end

if cstate == 'open' then
  for i = 2, #out, 2 do
    if out[i] == 2 then
      local w = take(tonumber(ARGV[4 + i / 2]))
      out[i - 1] = math.max(w, 0)
    end
  end
else
  for i = 5, #ARGV do
    out[#out + 1] = take(tonumber(ARGV[i]))
    out[#out + 1] = out[#out] < 0 and -1 or 0
  end
end
redis.call('HSET', KEYS[1], 'req', tostring(req), 'tok', tostring(tok), 'ts', tostring(now),
           'cool_next', tostring(cool_next))
redis.call('PEXPIRE', KEYS[1], 3600000)
return out
