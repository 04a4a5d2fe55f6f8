-- Commit one conversation's turns: compare-and-set on (gen, seq), then the deltas (or a new
-- base), the outbox events, the meta and the marker, atomically.
-- KEYS: meta, base, deltas, outbox, mark, ledger.
-- ARGV: expected_gen, expected_seq, new_seq, fp, writer, digest, mode ("d" append | "c" compact),
--       ttl_ms (0 = persist), src_topic ("" = none), src_partition, src_offset,
--       n_payload, n_outbox, mark_ttl_ms (0 = persist), tenant ("" = default), cid,
--       gen_start_partition ("" = unknown), gen_start_offset, payload..., outbox (seq, event)...,
--       ledger records (16 bytes per turn: seq, messages digest; "" = none), first delta seq
--       ("" = not given).
-- Reply: {status, stored_seq, n_deltas, compacted, gen}; status codes in stream/state/scripts.py.
local meta, base, deltas, outbox, mark = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local exp_gen, expected, new_seq = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local fp, writer, digest, mode = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local ttl_ms = tonumber(ARGV[8])
local n_payload, n_outbox = tonumber(ARGV[12]), tonumber(ARGV[13])
local mark_ttl_ms = tonumber(ARGV[14])

local kind, gen, stored = view(meta, base, deltas, mark)
if kind == 'corrupt' then
  return {4, stored, 0, 0, gen}
end
if kind == 'live' then
  local cur = redis.call('HMGET', meta, 'fp', 'digest')
  if cur[1] ~= fp then
    return {2, stored, redis.call('LLEN', deltas), 0, gen}
  end
  if gen ~= exp_gen or stored ~= expected then
    if tostring(stored) == new_seq and cur[2] == digest then
      -- our own commit, retried after its reply was lost: report success, change nothing
      return {3, stored, redis.call('LLEN', deltas), 0, gen}
    end
    return {0, stored, redis.call('LLEN', deltas), 0, gen}
  end
elseif gen ~= exp_gen or stored ~= expected then
  -- deleted / expired / reset since the writer looked: nobody brings the old memory back
  return {0, stored, 0, 0, gen}
end

local tail = 19 + n_payload + 2 * n_outbox
local first = ARGV[tail + 1]
local held = redis.call('HGET', mark, 'held_seq')
if kind == 'live' and held and first and first ~= '' and tonumber(first) > tonumber(held) then
  -- a quarantined turn waits (stream/state/lua/hold.lua): never commit past it; the writer
  -- re-reads, sees the hold and dead-letters its turns behind it
  return {0, stored, redis.call('LLEN', deltas), 0, gen}
end
local ledger = KEYS[6]
if kind ~= 'live' then
  redis.call('DEL', outbox)  -- a previous generation's undelivered events never leak into this one
  if ledger then redis.call('DEL', ledger) end  -- nor its applied turns
end
local i = 19
local compacted = 0
local base_seq = redis.call('HGET', meta, 'base_seq') or '-1'
if kind == 'live' and mode ~= 'c' then
  -- appending to a chain that lost a piece (a key evicted since the writer read it) would
  -- store a checkpoint that can never load; a compaction (the writer's full state at this
  -- very (gen, seq)) replaces the chain instead, which repairs it
  local n_meta = tonumber(redis.call('HGET', meta, 'n_deltas') or '0')
  if n_meta ~= redis.call('LLEN', deltas) or (tonumber(base_seq) >= 0 and redis.call('EXISTS', base) == 0) then
    return {4, stored, 0, 0, gen}
  end
end
if mode == 'c' then
  redis.call('SET', base, ARGV[i])
  redis.call('DEL', deltas)
  compacted = 1
  base_seq = new_seq
  i = i + 1
else
  for j = i, i + n_payload - 1 do
    redis.call('RPUSH', deltas, ARGV[j])
  end
  i = i + n_payload
end
for j = i, i + 2 * n_outbox - 1, 2 do
  redis.call('HSET', outbox, ARGV[j], ARGV[j + 1])
end
local records = ARGV[tail]
if ledger and records and records ~= '' then
  redis.call('APPEND', ledger, records)
  if ttl_ms > 0 then redis.call('PEXPIRE', ledger, ttl_ms) else redis.call('PERSIST', ledger) end
end

local n = redis.call('LLEN', deltas)
local t = redis.call('TIME')
local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', meta, 'seq', new_seq, 'gen', gen, 'base_seq', base_seq, 'n_deltas', n, 'fp', fp,
           'writer', writer, 'digest', digest, 'updated_at_ms', now_ms, 'tenant', ARGV[15], 'cid', ARGV[16])
if kind ~= 'live' and ARGV[17] ~= '' then
  -- where this generation began in the partition: older records belong to an earlier one
  redis.call('HSET', meta, 'gsp', ARGV[17], 'gso', ARGV[18])
end
if ARGV[9] ~= '' then
  redis.call('HSET', meta, 'src_topic', ARGV[9], 'src_partition', ARGV[10], 'src_offset', ARGV[11])
else
  redis.call('HDEL', meta, 'src_topic', 'src_partition', 'src_offset')
end
for k = 1, 4 do
  if ttl_ms > 0 then redis.call('PEXPIRE', KEYS[k], ttl_ms) else redis.call('PERSIST', KEYS[k]) end
end
redis.call('HSET', mark, 'gen', gen, 'seq', new_seq, 'status', 'live', 'tenant', ARGV[15], 'cid', ARGV[16],
           'at_ms', now_ms, 'gap_rejects', 0)
if held and (kind ~= 'live' or tonumber(new_seq) >= tonumber(held)) then
  -- the quarantined turn is applied now (or a new generation began): nothing waits any more
  redis.call('HDEL', mark, 'held_seq', 'held_reason')
end
if mark_ttl_ms > 0 then redis.call('PEXPIRE', mark, mark_ttl_ms) else redis.call('PERSIST', mark) end
return {1, tonumber(new_seq), n, compacted, gen}
