-- Give a namespace its identity, or replace it (an operator's decision), atomically.
-- KEYS: epoch. ARGV: the identity expected now ('' = none, '*' = only if none), then the new
-- hash as (field, value) pairs (it includes `id`).
-- Reply: {1, id} written; {0, current id or ''} refused (someone else got there first).
local cur = redis.call('HGET', KEYS[1], 'id') or ''
if ARGV[1] == '*' then
  if cur ~= '' then return {0, cur} end
elseif cur ~= ARGV[1] then
  return {0, cur}
end
redis.call('DEL', KEYS[1])  -- stray watermarks without an identity, or the replaced identity's
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return {1, redis.call('HGET', KEYS[1], 'id')}
