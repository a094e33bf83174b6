-- metrics: add a runner's counts since its last report to the batch's totals and
-- to the current 5-second bucket, which `status` sums over the last minute.
-- Buckets expire on their own; the bucket is chosen by Redis time, so runners
-- on machines with skewed clocks agree.
-- KEYS[1]  batch key
-- ARGV[1]  the prefix of its buckets' keys (keys.metrics_prefix: the bucket number follows)
-- ARGV     then pairs: counter name, amount (names: requests, tokens, rate_limited,
--          retries, ended, and per model requests:MODEL, charged:MODEL)
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
  end
end
redis.call('EXPIRE', key, 900)
return bucket
