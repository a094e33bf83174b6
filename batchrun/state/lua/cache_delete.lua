-- cache_delete: remove entries from the shared response cache (`cache clear`, a corrupt entry),
-- keeping its byte count right. With a cut-off, only entries stored before it go.
-- KEYS[1]  index: sorted set HASH -> expiry ms
-- KEYS[2]  sizes: hash HASH -> "bytes stored_ms"
-- KEYS[3]  the total bytes (a string counter)
-- ARGV[1]  the prefix of entry keys (the HASH follows)
-- ARGV[2]  cut-off, ms since the epoch (entries stored at or after it stay); '' for none
-- ARGV[3..] the HASHes
-- Returns  the number of entries removed
local prefix, cutoff = ARGV[1], tonumber(ARGV[2])
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local removed = 0
for i = 3, #ARGV do
  local h = ARGV[i]
  local info = redis.call('HGET', KEYS[2], h)
  local size, stored = 0, 0
  if info then
    local a, b = string.match(info, '^(%d+) (%d+)')
    size, stored = tonumber(a), tonumber(b)
  end
  if not cutoff or stored < cutoff then
    if info then total = total - size end
    redis.call('HDEL', KEYS[2], h)
    redis.call('ZREM', KEYS[1], h)
    removed = removed + redis.call('DEL', prefix .. h)
  end
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[3], total)
return removed
