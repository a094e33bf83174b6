-- metrics: add a runner's counts since its last report to the batch's totals and
-- to the current 5-second bucket, which `status` sums over the last minute (and the
-- dashboard over the last hour: buckets live 65 minutes).
-- Buckets expire on their own; the bucket is chosen by Redis time, so runners
-- on machines with skewed clocks agree.
-- KEYS[1]  batch key
-- KEYS[2]  the batch's running totals of the named counters (keys.sub(id, 'counts'): the
--          ones with a ':' in their name, which the batch hash does not keep; /metrics reads them)
-- ARGV[1]  the prefix of its buckets' keys (keys.metrics_prefix: the bucket number follows)
-- ARGV     then pairs: counter name, amount (names: requests, tokens, rate_limited,
--          retries, ended, and per model requests:MODEL, charged:MODEL; per budget via:BUDGET,
--          tok:BUDGET, rl:BUDGET and sc:CLASS:BUDGET, CLASS the answer's 2xx, 4xx, 5xx or error)
-- Returns  the bucket number (seconds // 5), or -1 if the batch is gone (purged)
local b = KEYS[1]
if redis.call('EXISTS', b) == 0 then return -1 end
local bucket = math.floor(server_time() / 5)
local key = ARGV[1] .. bucket
local totals = {}
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  if not string.find(ARGV[i], ':', 1, true) then
    redis.call('HINCRBY', b, 'n_' .. ARGV[i], ARGV[i + 1])
  elseif KEYS[2] then
    redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', key, 3900)  -- an hour of history, and a margin
return bucket
