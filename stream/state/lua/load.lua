-- One consistent read of a conversation (a commit cannot interleave between the reads).
-- KEYS: meta, base, deltas, outbox, mark.
-- Reply: {kind, gen, seq, meta_flat, base, deltas, outbox_flat, mark_flat}
local kind, gen, seq = view(KEYS[1], KEYS[2], KEYS[3], KEYS[5])
local m = redis.call('HGETALL', KEYS[5])
if kind == 'live' or kind == 'corrupt' then
  return {kind, gen, seq, redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or '',
          redis.call('LRANGE', KEYS[3], 0, -1), redis.call('HGETALL', KEYS[4]), m}
end
return {kind, gen, seq, {}, '', {}, {}, m}
