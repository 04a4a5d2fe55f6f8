-- Where a writer starts from ("the view"), computed the same way by the load, commit and end
-- scripts, so that a writer's expectation can be compared (prepended to each of them):
--   meta present                -> live:     (meta.gen, meta.seq)
--   no meta, marker present     -> expired / deleted / reset / cold: (marker.gen + 1, marker.seq)
--   neither                     -> new:      (1, -1)
--   no meta but base or deltas  -> corrupt (part of a memory state was evicted)
local function view(meta, base, deltas, mark)
  local cur = redis.call('HMGET', meta, 'seq', 'gen')
  if cur[1] then
    return 'live', tonumber(cur[2] or '1'), tonumber(cur[1])
  end
  if redis.call('EXISTS', base) == 1 or redis.call('EXISTS', deltas) == 1 then
    return 'corrupt', 0, -1
  end
  local m = redis.call('HMGET', mark, 'gen', 'seq', 'status')
  if m[1] then
    local status = m[3] or 'live'
    if status == 'live' then status = 'expired' end  -- the marker outlived its state
    return status, tonumber(m[1]) + 1, tonumber(m[2])
  end
  return 'new', 1, -1
end
