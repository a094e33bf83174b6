-- error_outcomes: the error lines among a stretch of a batch's outcomes (read only), so that
-- the dashboard's error tally does not carry every result's body over the network.
-- KEYS[1]  the batch's outcome list (keys.sub(id, 'results'): 'R'/'E' + output line)
-- ARGV[1]  the index to read from ('' for a first look: the last ARGV[3] outcomes)
-- ARGV[2]  how many outcomes to look at, at most
-- ARGV[3]  how far back a first look goes
-- Returns  {index read from, index after the last one read, each error line without its 'E'};
--          an index past the list's end (a batch purged and made again) reads as a first look
local len = redis.call('LLEN', KEYS[1])
local first = tonumber(ARGV[1])
if first == nil or first > len then first = math.max(0, len - tonumber(ARGV[3])) end
local last = math.min(len, first + tonumber(ARGV[2])) - 1
local out = {first, last + 1}
if last >= first then
  for _, line in ipairs(redis.call('LRANGE', KEYS[1], first, last)) do
    if string.sub(line, 1, 1) == 'E' then out[#out + 1] = string.sub(line, 2) end
  end
end
return out
