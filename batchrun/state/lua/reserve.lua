-- reserve: the gate every request passes before it is sent. In one call it
--  * takes capacity from the shared requests/tokens-per-minute budget. Buckets
--    refill continuously at limit/60 per second up to their burst capacity. A
--    reservation is granted in arrival order and may run the bucket into debt;
--    the caller waits until its debt is paid off: first come first served (a
--    large request is not starved by small ones) and nobody polls Redis.
--  * charges what the server will charge: k * input estimate + output, where k
--    is learnt from the server's headers (observe.lua).
--  * uses limits learnt from the headers where none were configured, and the
--    burst capacity the headers showed where no limit or burst was configured.
--    A configured limit is a ceiling: its bucket holds one second's worth
--    (or --burst-seconds), whatever the server shows.
--  * honours the budget's cooldown (cool_down.lua, after a 429): requests
--    reserved during it are released one `spacing` apart after it ends.
--  * honours the endpoint's circuit breaker (circuit.lua): while open nothing is
--    granted; once its cooling period is over exactly one request may probe.
-- KEYS[1]  budget hash
-- KEYS[2]  circuit hash of the endpoint (state, open_until, probe_until)
-- KEYS[3]  set of budgets in use (this budget joins it, for maintenance and `batchrun limits`)
-- ARGV[1]  requests per minute configured (0: learn from headers, or none)
-- ARGV[2]  tokens per minute configured (0: learn from headers, or none)
-- ARGV[3]  burst capacity in seconds' worth of the limit (0: learn from headers)
-- ARGV[4]  spacing in ms between requests released after a cooldown (0: 60000/rpm, else 5)
-- ARGV     then for each request: input token estimate (charged k times), output token
--          reservation, and the smallest input estimate (judges "can never fit")
-- Fair share (fairshare.lua's contract, only with KEYS[4] and KEYS[5]): KEYS[4] the budget's
--          fair-share hash, KEYS[5] its queue of reservations not yet due; ARGV[5] the caller's
--          batch id, ARGV[6] its weight (0: low); the requests' triples then start at ARGV[7].
--          Verdict 3: not granted, the batch holds its share of the budget: ask again after ms.
-- Returns  for each request {ms, verdict, charge, mark, request mark}:
--          verdict 0: granted, send after ms;  2: granted as the circuit's probe;
--          1: not granted (circuit open), ask again after ms;  -1: can never fit
--          (judged on the smallest input estimate + output, not k * input: a k
--          inflated by other traffic on the key must not fail a request the
--          server would accept).
--          charge: the tokens taken (give them back with settle.lua if unused).
--          mark: the budget's running total of tokens taken, including this
--          request (observe.lua uses it to tell what was reserved after it;
--          level.lua tells when the budget has reached it); request mark: the
--          same count in requests.
local b = KEYS[1]
local now = now_ms()
local s = redis.call('HMGET', b, 'req', 'tok', 'ts', 'cool_until', 'cool_next', 'lim_rpm', 'lim_tpm',
                     'cap_r', 'cap_t', 'k', 'spent', 'spent_r')
local cfg_r, cfg_t = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Batches sharing a key and model share its strictest limit: the smallest configured by those that
-- reserved in the last minute (kept with when it was last used), whatever this caller's. The limits
-- found are written as cfg_rpm/cfg_tpm, which level, observe and cool_down use.
local function strictest(cfg, v, at)
  v, at = tonumber(v or 0), tonumber(at or 0)
  if v > 0 and now - at < 60000 and (cfg == 0 or v < cfg) then return v end
  return cfg
end
local low = redis.call('HMGET', KEYS[1], 'low_r', 'low_r_at', 'low_t', 'low_t_at')
local own_r, own_t = cfg_r, cfg_t
cfg_r, cfg_t = strictest(cfg_r, low[1], low[2]), strictest(cfg_t, low[3], low[4])
local rpm = cfg_r > 0 and cfg_r or tonumber(s[6] or 0)
local tpm = cfg_t > 0 and cfg_t or tonumber(s[7] or 0)
local burst = tonumber(ARGV[3])
local cap_r, cap_t
if burst > 0 then
  cap_r, cap_t = rpm * burst / 60, tpm * burst / 60
else
  -- One second's worth: no start-of-minute burst on a server that enforces per
  -- second. Without a configured limit, what the server's headers showed it
  -- takes at once (observe.lua); a configured one is a ceiling, so no more.
  cap_r = math.max(1, cfg_r > 0 and 0 or tonumber(s[8] or 0), rpm / 60)
  cap_t = math.max(cfg_t > 0 and 0 or tonumber(s[9] or 0), tpm / 60)
end
-- "Request too large" is judged against the per-minute limit, whatever the burst: a reservation may
-- run the bucket into debt, so a request bigger than the burst waits for it instead of failing.
local max_t = tpm
local k = tonumber(s[10] or 1)
-- Under a configured limit the charge never falls below the estimate reserved by (the larger of
-- tiktoken's count and characters / 4): k may only raise it. Headers that say nothing was taken (a
-- proxy echoing fixed headers) would otherwise teach k < 1 and break the ceiling.
if cfg_t > 0 and k < 1 then k = 1 end
local spacing = tonumber(ARGV[4])
if spacing <= 0 then spacing = rpm > 0 and 60000 / rpm or 5 end
local fair_batch = #KEYS >= 5 and ARGV[5] or ''
local base = #KEYS >= 5 and 6 or 4  -- the requests' triples follow the fixed arguments
local n = (#ARGV - base) / 3
local out = {}

local function charge_of(i)
  return math.ceil(k * tonumber(ARGV[base - 2 + 3 * i]) + tonumber(ARGV[base - 1 + 3 * i]))
end

local function too_large(i)
  return tpm > 0 and math.ceil(tonumber(ARGV[base + 3 * i]) + tonumber(ARGV[base - 1 + 3 * i])) > max_t
end

-- The circuit first: an open circuit grants nothing and spends no budget.
local c = redis.call('HMGET', KEYS[2], 'state', 'open_until', 'probe_until')
local circuit_open = c[1] == 'open'
local probe = nil
if circuit_open then
  local open_until, probe_until = tonumber(c[2] or 0), tonumber(c[3] or 0)
  for i = 1, n do
    local r
    if too_large(i) then
      r = {-1, -1, 0, 0, 0}
    elseif now < open_until then
      r = {math.ceil(open_until - now), 1, 0, 0, 0}
    elseif now >= probe_until and not probe then
      probe = i
      redis.call('HSET', KEYS[2], 'probe_until', tostring(now + 30000))
      r = {0, 2, 0, 0, 0}
    else
      r = {1000, 1, 0, 0, 0}  -- a probe is out: ask again soon
    end
    for _, v in ipairs(r) do out[#out + 1] = v end
  end
  if not probe then return out end
end

local req, tok, ts = tonumber(s[1] or cap_r), tonumber(s[2] or cap_t), tonumber(s[3] or now)
local cool_until, cool_next = tonumber(s[4] or 0), tonumber(s[5] or 0)
local spent, spent_r = tonumber(s[11] or 0), tonumber(s[12] or 0)
local elapsed = math.max(0, now - ts)
req = math.min(cap_r, req + elapsed * rpm / 60000)
tok = math.min(cap_t, tok + elapsed * tpm / 60000)

local function take(i)
  if too_large(i) then return {-1, -1, 0, 0, 0} end
  local charge = charge_of(i)
  local w = 0
  if rpm > 0 then
    req = req - 1
    if req < 0 then w = math.max(w, -req * 60000 / rpm) end
  end
  if tpm > 0 then
    tok = tok - charge
    if tok < 0 then w = math.max(w, -tok * 60000 / tpm) end
  end
  if now < cool_until then
    cool_next = math.max(cool_next, cool_until) + spacing
    w = math.max(w, cool_next - now)
  end
  spent = spent + charge
  spent_r = spent_r + 1
  return {math.ceil(w), 0, charge, spent, spent_r}
end

-- Fair share between batches (fairshare.lua): how much more this batch may queue, or nil (no limit).
local room, share_rate = nil, 0
if fair_batch ~= '' and not circuit_open then
  room, share_rate = fair_room(KEYS[4], KEYS[5], fair_batch, tonumber(ARGV[6]), now, rpm, tpm,
                               spent + math.min(tok, 0), spent, spent_r + math.min(req, 0), spent_r)
end

for i = 1, n do
  if room ~= nil and room <= 0 then
    for _, v in ipairs({fair_wait(room, share_rate), 3, 0, 0, 0}) do out[#out + 1] = v end
  elseif not circuit_open then
    local r = take(i)
    for _, v in ipairs(r) do out[#out + 1] = v end
    if room ~= nil and r[2] == 0 then room = fair_queued(KEYS[4], KEYS[5], fair_batch, r, room) end
  elseif i == probe then
    local r = take(i)
    out[5 * i - 4], out[5 * i - 2], out[5 * i - 1], out[5 * i] = r[1], r[3], r[4], r[5]
  end
end
redis.call('HSET', b, 'req', tostring(req), 'tok', tostring(tok), 'ts', tostring(now),
           'cool_next', tostring(cool_next), 'spent', tostring(spent), 'spent_r', tostring(spent_r),
           'cfg_rpm', tostring(cfg_r), 'cfg_tpm', tostring(cfg_t))
-- This caller's limit is the strictest (or the last one lapsed): it holds for the next minute.
if own_r > 0 and own_r == cfg_r then redis.call('HSET', b, 'low_r', tostring(own_r), 'low_r_at', tostring(now)) end
if own_t > 0 and own_t == cfg_t then redis.call('HSET', b, 'low_t', tostring(own_t), 'low_t_at', tostring(now)) end
redis.call('PEXPIRE', b, 86400000)
if fair_batch ~= '' then
  redis.call('PEXPIRE', KEYS[4], 86400000)
  redis.call('PEXPIRE', KEYS[5], 86400000)
end
redis.call('SADD', KEYS[3], b)
return out
