-- cool_down: a 429 said the budget is exhausted: stop the whole fleet sending
-- on it until the server's hint has passed, and empty the buckets so that
-- afterwards traffic comes back at the refill rate, not all at once.
-- KEYS[1]  budget hash
-- ARGV[1]  cooldown in ms (the server's wait hint)
-- ARGV[2]  requests per minute configured (0: learnt or none)
-- ARGV[3]  tokens per minute configured (0: learnt or none)
-- Returns  1
local now = now_ms()
local s = redis.call('HMGET', KEYS[1], 'cool_until', 'req', 'tok', 'ts', 'lim_rpm', 'lim_tpm')
-- The budget's limits are the strictest of the batches on it lately (reserve.lua keeps them there).
local eff = redis.call('HMGET', KEYS[1], 'cfg_rpm', 'cfg_tpm')
local cool_until = math.max(tonumber(s[1] or 0), now + tonumber(ARGV[1]))
local fields = {'cool_until', tostring(cool_until)}
if tonumber(s[1] or 0) < now then
  fields[#fields + 1] = 'cool_next'
  fields[#fields + 1] = tostring(cool_until)
end
if s[4] then
  -- Refill to now first (a bucket in debt keeps paying it off), then empty what is left.
  local cfg_r, cfg_t = tonumber(eff[1]) or tonumber(ARGV[2]), tonumber(eff[2]) or tonumber(ARGV[3])
  local rpm = cfg_r > 0 and cfg_r or tonumber(s[5] or 0)
  local tpm = cfg_t > 0 and cfg_t or tonumber(s[6] or 0)
  local elapsed = math.max(0, now - tonumber(s[4]))
  local req = tonumber(s[2] or 0) + elapsed * rpm / 60000
  local tok = tonumber(s[3] or 0) + elapsed * tpm / 60000
  for _, v in ipairs({'req', tostring(math.min(req, 0)), 'tok', tostring(math.min(tok, 0)), 'ts', tostring(now)}) do
    fields[#fields + 1] = v
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
