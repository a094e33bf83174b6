-- cache_release: let go of the claim on sending one request (in-batch dedupe), only if this
-- runner still holds it: a claim that lapsed and was taken by another runner stays theirs.
-- KEYS[1]  the claim (batchrun:{cache}:sending:HASH)
-- ARGV[1]  the runner's owner string
-- ARGV[2]  '' to release; a time in ms to renew the claim for instead
-- Returns  1 if it was this runner's, else 0
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
