-- observe: let the server's x-ratelimit-* headers correct the shared budget.
--  * Limits: x-ratelimit-limit-* are learnt (used where none were configured).
--  * Burst: the server's capacity is at least what it showed remaining plus the
--    charge it had just taken. The budget holds that much only where no limit
--    was configured: a configured one is a ceiling (one second's worth at once).
--  * Sync: the server's remaining tokens, less what the fleet reserved after
--    the request these headers answered, is what the budget holds now. Less
--    than we thought (another client on the same key, a lower limit) slows the
--    fleet; more (the server's initial burst) lets it use what is there, but
--    only where no limit was configured: under a configured one, headers may
--    only lower the pace. A headroom of one second's worth stays unused: at
--    the limit the server's bucket hovers at empty, and without it every small
--    error is a 429. Where the server's headers tell its bucket is small
--    (ARGV[15]: a limit enforced per second), a quarter of that bucket instead:
--    a second's worth would be all of it, and the fleet would wait for a bucket
--    to fill that throws away what refills beyond full (~half the limit spent).
--  * Calibration gives k, the ratio of the server's input charge to our input
--    estimate, two ways:
--    - over windows of >= 2 s in which the server's bucket was not full, the
--      tokens it consumed (its own refill, at its limit, - change of
--      remaining), less the output reserved, against the input estimates of
--      the requests it admitted;
--    - while its bucket is full (the fleet keeps to under half the server's
--      limit, so no refill is measurable), from what each answer's admission
--      took (limit - remaining): the runner sends that ratio (ARGV[13]).
-- KEYS[1]  budget hash
-- ARGV[1]  x-ratelimit-limit-requests ('' if absent)
-- ARGV[2]  x-ratelimit-limit-tokens ('' if absent)
-- ARGV[3]  x-ratelimit-remaining-requests ('' if absent)
-- ARGV[4]  x-ratelimit-remaining-tokens ('' if absent)
-- ARGV[5]  the charge reserve.lua took for the request these headers answered
-- ARGV[6]  '1' if the answer came fast enough for remaining to be current
-- ARGV[7]  requests per minute configured (0: none)
-- ARGV[8]  tokens per minute configured (0: none)
-- ARGV[9]  the budget's running total of tokens taken when that request was reserved (reserve.lua's mark)
-- ARGV[10] input estimates of the requests the server admitted since this runner last reported
-- ARGV[11] output reservations of those requests
-- ARGV[12] burst capacity in seconds' worth (0: learnt), as for reserve.lua
-- ARGV[13] the server's input charge / our input estimate, from answers admitted into a full
--          bucket ('' if none)
-- ARGV[14] the charge of a request that reached the server late (a runner's first, sent while its
--          client started up): it is taken again, as arriving now. Where it was reserved, nobody
--          else could send, so counting it twice only costs the fleet one request's worth (0: none)
-- ARGV[15] the server's token bucket size, as the latest fresh headers told it (budget_headers.py
--          told_bucket: remaining + reset-tokens' refill); '' if they did not (then the last told)
-- Returns  k after this observation, as a string
local b = KEYS[1]
local HEADROOM_SHARE = 0.25  -- of a server bucket smaller than four seconds' worth
-- tonumber() takes 'nan', 'inf' and '1e999': a header is used only if it is a finite number in
-- [0, 1e13] (limiter.py's usable_header_number has the same rule), and a stored field that is not
-- finite (written by an older version) reads as its default, so no such value is ever stored.
local function header(x)
  local n = tonumber(x)
  if n and n == n and n >= 0 and n <= 1e13 then return n end
  return nil
end
local function stored(x, default)
  local n = tonumber(x)
  if n and n == n and n > -math.huge and n < math.huge then return n end
  return default
end
local now = now_ms()
local s = redis.call('HMGET', b, 'req', 'tok', 'ts', 'lim_rpm', 'lim_tpm', 'cap_r', 'cap_t', 'k',
                     's_in', 's_out', 'obs_t', 'obs_rem', 'obs_in', 'obs_out', 'spent', 'obs_mark', 'srv_cap')
if not s[3] then return '1' end  -- no budget yet: reserve.lua makes it
local lim_r = header(ARGV[1]) or stored(s[4], 0)
local lim_t = header(ARGV[2]) or stored(s[5], 0)
-- A negative remaining (never OpenAI's, a proxy's maybe) is "nothing left", not days of debt.
local function remaining(x)
  local n = tonumber(x)
  if n and n < 0 and n > -1e13 then return 0 end
  return header(x)
end
local rem_r, rem_t = remaining(ARGV[3]), remaining(ARGV[4])
local cfg_r, cfg_t = tonumber(ARGV[7]), tonumber(ARGV[8])
-- The budget's limits are the strictest of the batches on it lately (reserve.lua keeps them there).
local eff = redis.call('HMGET', KEYS[1], 'cfg_rpm', 'cfg_tpm')
cfg_r, cfg_t = tonumber(eff[1]) or cfg_r, tonumber(eff[2]) or cfg_t
local rpm = cfg_r > 0 and cfg_r or lim_r
local tpm = cfg_t > 0 and cfg_t or lim_t
local burst = tonumber(ARGV[12]) or 0
-- What the server showed it takes at once (kept whatever is configured: the
-- calibration below tells a full bucket by it).
local cap_r, cap_t = stored(s[6], 0), stored(s[7], 0)
if rem_r then cap_r = math.max(cap_r, rem_r + 1) end
if rem_t then cap_t = math.max(cap_t, rem_t + tonumber(ARGV[5])) end
if lim_r > 0 then cap_r = math.min(cap_r, lim_r) end
if lim_t > 0 then cap_t = math.min(cap_t, lim_t) end
-- As reserve.lua: at least one second's worth, also before any remaining-* header was seen.
cap_r, cap_t = math.max(cap_r, 1, rpm / 60), math.max(cap_t, tpm / 60)
-- What the budget holds at most: as reserve.lua and level.lua have it.
local own_r = burst > 0 and rpm * burst / 60 or (cfg_r > 0 and math.max(1, rpm / 60) or cap_r)
local own_t = burst > 0 and tpm * burst / 60 or (cfg_t > 0 and tpm / 60 or cap_t)

-- Bring the buckets to now, then to what the server says.
local req, tok, ts = stored(s[1], 0), stored(s[2], 0), stored(s[3], now)
local elapsed = math.max(0, now - ts)
if rpm > 0 then req = math.min(math.max(own_r, 1), req + elapsed * rpm / 60000) end
if tpm > 0 then tok = math.min(own_t, tok + elapsed * tpm / 60000) end
-- The headroom: one second's worth, or a quarter of a smaller server bucket (told, never guessed:
-- cap_t is only a lower bound, which another client draining the bucket keeps small).
local srv_cap = header(ARGV[15]) or stored(s[17], 0)
local headroom = tpm / 60
if srv_cap > 0 then headroom = math.min(headroom, HEADROOM_SHARE * srv_cap) end
-- Only headers newer than those already applied (answers can overtake each other).
local fresh = ARGV[6] == '1' and tonumber(ARGV[9]) >= tonumber(s[16] or 0)
if fresh and rem_t and tpm > 0 then
  local reserved_since = math.max(0, tonumber(s[15] or 0) - tonumber(ARGV[9]))
  -- A negative remaining is read as 0: one header must not put the fleet in debt for days.
  local synced = math.max(0, rem_t) - reserved_since - headroom
  -- A configured limit is a ceiling: the server's headers may lower the budget, never raise it.
  tok = math.min(cfg_t > 0 and tok or own_t, synced)
end
if fresh and rem_r and rem_r - 1 < req then req = rem_r - 1 end
local late = tonumber(ARGV[14]) or 0
if late > 0 and tpm > 0 then tok = tok - late end
if late > 0 and rpm > 0 then req = req - 1 end  -- and it is one request (one first per runner)

local k = stored(s[8], 1)
local s_in = tonumber(s[9] or 0) + tonumber(ARGV[10])
local s_out = tonumber(s[10] or 0) + tonumber(ARGV[11])
local fields = {'s_in', tostring(s_in), 's_out', tostring(s_out),
                'obs_mark', tostring(math.max(tonumber(s[16] or 0), tonumber(ARGV[9]))),
                'lim_rpm', tostring(lim_r), 'lim_tpm', tostring(lim_t), 'cap_r', tostring(cap_r),
                'cap_t', tostring(cap_t), 'req', tostring(req), 'tok', tostring(tok), 'ts', tostring(now),
                'k', tostring(k), 'srv_cap', tostring(srv_cap)}  -- (a k set below comes later in HSET, and wins)
-- The server refills at its own limit, whatever limit the fleet keeps to.
local srv_tpm = lim_t > 0 and lim_t or tpm
local k_seen = tonumber(ARGV[13])
if rem_t and srv_tpm > 0 then
  local obs_t = tonumber(s[11] or 0)
  local window = now - obs_t
  -- Only windows in which the server's bucket was not full tell the charge
  -- (a full bucket throws its refill away).
  local busy = rem_t < 0.9 * cap_t
  -- Answers find the server's bucket full (their deficit their own) only where the server refills
  -- much faster than the fleet spends: at under half its limit. Nearer it, deficits carry the
  -- fleet's earlier requests too, and would inflate k.
  if not busy and k_seen and lim_t >= 2 * tpm then
    k = 0.75 * k + 0.25 * math.max(0.25, math.min(4, k_seen))
    fields[#fields + 1], fields[#fields + 2] = 'k', tostring(k)
  end
  if obs_t == 0 or not busy then
    fields[#fields + 1], fields[#fields + 2] = 'obs_t', busy and tostring(now) or '0'
    fields[#fields + 1], fields[#fields + 2] = 'obs_rem', tostring(rem_t)
    fields[#fields + 1], fields[#fields + 2] = 'obs_in', tostring(s_in)
    fields[#fields + 1], fields[#fields + 2] = 'obs_out', tostring(s_out)
  elseif window >= 2000 then
    local refill = srv_tpm * window / 60000
    local consumed = refill - (rem_t - tonumber(s[12]))
    local d_in, d_out = s_in - tonumber(s[13]), s_out - tonumber(s[14])
    -- The refill counts as consumed only if the bucket cannot have been full in the window: from
    -- where it started, the refill alone must not reach its capacity. A small bucket (a second's
    -- worth: a quantised limit) fills between two answers and throws refill away, which would
    -- read as charge and inflate k, slowing the fleet to a fraction of the limit.
    local unfilled = tonumber(s[12]) + refill < cap_t
    if unfilled and d_in > 0 and consumed > d_out then  -- else the window tells nothing of the input's charge
      local k_new = math.max(0.25, math.min(4, (consumed - d_out) / d_in))
      k = 0.5 * k + 0.5 * k_new
      fields[#fields + 1], fields[#fields + 2] = 'k', tostring(k)
    end
    fields[#fields + 1], fields[#fields + 2] = 'obs_t', tostring(now)
    fields[#fields + 1], fields[#fields + 2] = 'obs_rem', tostring(rem_t)
    fields[#fields + 1], fields[#fields + 2] = 'obs_in', tostring(s_in)
    fields[#fields + 1], fields[#fields + 2] = 'obs_out', tostring(s_out)
  end
end
redis.call('HSET', b, unpack(fields))
redis.call('PEXPIRE', b, 86400000)
return tostring(k)
