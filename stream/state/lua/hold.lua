-- A turn of this conversation was dead-lettered because its memory could not be read
-- (quarantine): later turns must wait behind it on every worker, never be applied over the hole.
-- KEYS: mark. ARGV: seq, reason code, tenant, cid, mark_ttl_ms (0 = keep the current TTL).
-- (view.lua is prepended like to every script; this one reads only the marker.)
-- Reply: the seq held from now (the lowest quarantined one), -1 if nothing is held (a turn at
-- or below the last applied seq is a replay: nothing waits for it).
local applied = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
local cur = redis.call('HGET', KEYS[1], 'held_seq')
if tonumber(ARGV[1]) <= applied then
  return tonumber(cur or '-1')
end
if (not cur) or tonumber(ARGV[1]) < tonumber(cur) then
  redis.call('HSET', KEYS[1], 'held_seq', ARGV[1], 'held_reason', ARGV[2], 'tenant', ARGV[3], 'cid', ARGV[4])
  cur = ARGV[1]
  if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
end
return tonumber(cur)
