-- Advance the store's watermarks: "every input record through this offset is reflected here".
-- Never creates the identity: a store that lost it (emptied) must not look whole again.
-- KEYS: epoch. ARGV: the identity the writer knows, then (field, offset, floor) triples: floor
-- is what the writer already acknowledged on that partition (-1: nothing).
-- Reply: 1 written (fields only move forward), 0 the identity is gone, -1 another identity,
-- -2 the store is behind a floor (restored from an old snapshot): nothing written.
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  return 0
end
if id ~= ARGV[1] then
  return -1
end
for i = 2, #ARGV, 3 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if cur < tonumber(ARGV[i + 2]) then
    return -2
  end
end
for i = 2, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
