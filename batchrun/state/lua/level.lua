-- level: how far a budget has come, for runners whose requests wait their turn.
-- A reservation's mark is the budget's running total of tokens taken up to and
-- including it; it may be sent once `avail` (tokens taken + tokens available
-- now) reaches its mark. Waiters follow the level rather than a wait fixed at
-- reservation, so that when the server's headers move the budget (sync) they
-- go earlier or later, still in the order they reserved.
-- KEYS[1]  budget hash
-- ARGV[1]  requests per minute configured (0: learnt or none)
-- ARGV[2]  tokens per minute configured (0: learnt or none)
-- ARGV[3]  burst capacity in seconds' worth (0: learnt)
-- Returns  {now ms, avail tokens, tokens per ms, avail requests, requests per ms, cooldown end ms,
--          tokens taken, requests taken} as strings (a rate of 0: no such limit). The totals
--          taken only grow: one below a waiter's mark says the budget was lost (deleted, or
--          Redis restarted from an older snapshot) and that mark will never be reached.
local now = now_ms()
local s = redis.call('HMGET', KEYS[1], 'tok', 'ts', 'spent', 'lim_tpm', 'cap_t', 'cool_until',
                     'req', 'spent_r', 'lim_rpm', 'cap_r')
local cfg_r, cfg_t = tonumber(ARGV[1]), tonumber(ARGV[2])
-- The budget's limits are the strictest of the batches on it lately (reserve.lua keeps them there).
local eff = redis.call('HMGET', KEYS[1], 'cfg_rpm', 'cfg_tpm')
cfg_r, cfg_t = tonumber(eff[1]) or cfg_r, tonumber(eff[2]) or cfg_t
local rpm = cfg_r > 0 and cfg_r or tonumber(s[9] or 0)
local tpm = cfg_t > 0 and cfg_t or tonumber(s[4] or 0)
local burst = tonumber(ARGV[3])
-- The capacities as reserve.lua has them (a configured limit: one second's worth).
local cap_t = burst > 0 and tpm * burst / 60 or math.max(cfg_t > 0 and 0 or tonumber(s[5] or 0), tpm / 60)
local cap_r = burst > 0 and rpm * burst / 60 or math.max(1, cfg_r > 0 and 0 or tonumber(s[10] or 0), rpm / 60)
local elapsed = math.max(0, now - tonumber(s[2] or now))
local tok = math.min(cap_t, tonumber(s[1] or cap_t) + elapsed * tpm / 60000)
local req = math.min(cap_r, tonumber(s[7] or cap_r) + elapsed * rpm / 60000)
return {tostring(now), tostring(tonumber(s[3] or 0) + tok), tostring(tpm / 60000),
        tostring(tonumber(s[8] or 0) + req), tostring(rpm / 60000), s[6] or '0',
        tostring(tonumber(s[3] or 0)), tostring(tonumber(s[8] or 0))}
