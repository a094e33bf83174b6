-- circuit: record how requests to an endpoint ended, and open the circuit when
-- most recent ones failed with 5xx or connection errors (an outage): then
-- nothing is sent for a cooling period (doubling on each failed probe, up to a
-- cap) until one probe request succeeds. It also keeps when the endpoint went
-- down (its first outage-like failure since its last answer), so that a batch
-- can give up on a server that does not come back.
-- KEYS[1]  circuit hash (state, ok, fail, win_start, open_until, probe_until, trips, url, down_since)
-- ARGV[1]  endpoint URL (shown by `status`; without credentials)
-- ARGV[2]  window in ms over which outcomes are counted
-- ARGV[3]  fewest outcomes in the window before the circuit may open
-- ARGV[4]  failure share that opens it (0..1)
-- ARGV[5]  first cooling period, ms
-- ARGV[6]  longest cooling period, ms
-- ARGV[7]  successes since the last call
-- ARGV[8]  failures (outage-like) since the last call
-- ARGV[9]  probe outcome: '1' succeeded, '0' failed, '' no probe
-- ARGV[10] give-up time in ms of the caller's batch ('' or 0: none): a cooling period ends no
--          later than down_since + this, so that a probe tells at that moment whether to give up
-- Returns  {state, open_until ms, now ms, down_since ms (0: not down)}
local k = KEYS[1]
local now = now_ms()
local h = redis.call('HMGET', k, 'state', 'ok', 'fail', 'win_start', 'open_until', 'trips', 'down_since')
local state = h[1] or 'closed'
local ok, fail, win_start = tonumber(h[2] or 0), tonumber(h[3] or 0), tonumber(h[4] or 0)
local open_until, trips = tonumber(h[5] or 0), tonumber(h[6] or 0)
local down_since = tonumber(h[7] or 0)
local window, min_n, ratio = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local base_cool, max_cool = tonumber(ARGV[5]), tonumber(ARGV[6])
local give_up = tonumber(ARGV[10] or '') or 0

-- Any answer means the endpoint is up; failures with no answer among them start (or continue) an outage.
if tonumber(ARGV[7]) > 0 or ARGV[9] == '1' then
  down_since = 0
elseif (tonumber(ARGV[8]) > 0 or ARGV[9] == '0') and down_since == 0 then
  down_since = now
end

local function open()
  trips = trips + 1
  state = 'open'
  open_until = now + math.min(max_cool, base_cool * 2 ^ (trips - 1))
  if give_up > 0 and down_since > 0 and down_since + give_up > now then
    open_until = math.min(open_until, down_since + give_up)
  end
  ok, fail, win_start = 0, 0, now
  redis.call('HSET', k, 'probe_until', '0')  -- one probe may go once the cooling is over
end

if ARGV[9] == '1' then
  state, trips, ok, fail, win_start = 'closed', 0, 0, 0, now
elseif ARGV[9] == '0' then
  open()
end
if state == 'closed' then
  if now - win_start > window then ok, fail, win_start = 0, 0, now end
  ok = ok + tonumber(ARGV[7])
  fail = fail + tonumber(ARGV[8])
  if ok + fail >= min_n and fail >= ratio * (ok + fail) then open() end
end
redis.call('HSET', k, 'state', state, 'ok', ok, 'fail', fail, 'win_start', tostring(win_start),
           'open_until', tostring(open_until), 'trips', trips, 'url', ARGV[1],
           'down_since', tostring(math.floor(down_since)))
redis.call('PEXPIRE', k, 86400000)
return {state, tostring(math.floor(open_until)), tostring(math.floor(now)), tostring(math.floor(down_since))}
