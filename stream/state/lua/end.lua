-- End a conversation's memory (delete, or an operator's reset): drop its state keys and leave
-- a marker (gen, last seq, status) that refuses every commit computed before it.
-- KEYS: meta, base, deltas, outbox, mark (, ledger). ARGV: status, mark_ttl_ms (0 = persist), tenant, cid,
-- partition ("" = unknown) and offset of the delete record.
-- Reply: {existed (0|1, or -1: a replayed delete older than the live generation, ignored), last_seq, gen}
local kind, gen, seq = view(KEYS[1], KEYS[2], KEYS[3], KEYS[5])
if kind == 'live' and ARGV[5] ~= '' then
  local g = redis.call('HMGET', KEYS[1], 'gsp', 'gso')
  if g[1] == ARGV[5] and tonumber(g[2]) > tonumber(ARGV[6]) then
    return {-1, seq, gen}
  end
end
local existed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
if KEYS[6] then redis.call('DEL', KEYS[6]) end
local mark_gen = gen
if kind ~= 'live' and kind ~= 'corrupt' then mark_gen = gen - 1 end
if kind == 'corrupt' then
  local m = redis.call('HMGET', KEYS[5], 'gen', 'seq')
  mark_gen = tonumber(m[1] or '0')
  seq = tonumber(m[2] or '-1')
end
local t = redis.call('TIME')
local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[5], 'gen', mark_gen, 'seq', seq, 'status', ARGV[1], 'tenant', ARGV[3],
           'cid', ARGV[4], 'at_ms', now_ms, 'gap_rejects', 0)
redis.call('HDEL', KEYS[5], 'held_seq', 'held_reason')  -- the repair (or the delete) ends a quarantine
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[5], 'del_p', ARGV[5], 'del_o', ARGV[6])
else
  redis.call('HDEL', KEYS[5], 'del_p', 'del_o')
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[5], ttl) else redis.call('PERSIST', KEYS[5]) end
if existed > 0 then existed = 1 end
return {existed, seq, mark_gen}
