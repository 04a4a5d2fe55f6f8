"""Cold tier: idle conversations' checkpoints moved out of Redis to sharded SQLite files, brought
back exactly.

Why: a conversation's memory is up to a few MiB of Redis RAM (docs/CAPACITY.md), but most
conversations of a large deployment are idle most of the time. RAM is the scarce resource;
disk is not. Moving an idle conversation's keys to an embedded database (SQLite, in the
standard library, nothing to run) and restoring them byte for byte on its next turn keeps the
memory without paying RAM for it. The files are shards (stream/state/cold_store.py): written in
parallel, and one bad file quarantines only the conversations it holds.

How it stays safe next to live writers (the checkpoint store's compare-and-set on (gen, seq)):

* freeze = read the conversation (one consistent script read), write the copy to its shard and
  commit it, THEN a Lua script deletes the Redis keys only if meta still has the same seq,
  generation and commit digest, and sets the marker's status to `cold`. A conversation that
  moved on in between is left alone (its copy is dropped). A crash between the two steps leaves
  the state in Redis and a stale copy on disk: harmless, never a loss. A conversation whose shard
  is quarantined is not frozen (it stays in Redis; the report counts it as `failed`).
* while cold, the store's view of the conversation is `cold` (generation + 1), so a worker
  still holding it in its cache loses its compare-and-set (STALE) and reloads; no writer can
  mistake it for a new conversation.
* thaw (done by `MemoryStore.load_many` when the store has a cold tier) = a Lua script
  restores meta, base, deltas and outbox exactly as they were, only if the marker still says
  `cold` at the same (gen, seq) and no meta exists, refreshes the TTLs like a commit, and sets
  the marker back to `live`; then the row is dropped. Delete/reset drop the row too. A row that
  cannot be read (its shard quarantined) is not restored: the store reports the conversation as
  `checkpoint_corrupt` with `why_missing`'s reason, and its turns are dead-lettered.

Operator commands (`evostream cold-tier freeze|purge|stats`, stream/cli/cold_tier.py): run
`freeze --idle-s 3600` from cron or a timer; several freezers can split the shards between them
(`--shards 0-7`, `--shards 8-15`). Workers thaw on their own: a worker whose
EVOSTREAM_COLD_TIER_PATH names the same directory restores a frozen conversation when its next
turn arrives (every worker must reach the files: one host, or a shared volume; docs/CAPACITY.md
describes the path to object storage or a database for a multi-host fleet at 10M conversations).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.identity import ConversationRef, RefLike, as_ref
from stream.state.keys import ConversationKeys
from stream.state.cold_store import DEFAULT_SHARDS, ColdRecord, ColdStore, Shard, ShardUnreadable, shard_of

if TYPE_CHECKING:
    from stream.state.store import MemoryStore

__all__ = ["ColdRecord", "ColdTier", "FreezeReport", "store_levers"]

# KEYS: meta, base, deltas, outbox, mark. ARGV: gen, seq, digest, mark_ttl_ms (0 = persist).
# Reply: 1 frozen, 0 changed since it was read (left alone).
_FREEZE_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'seq', 'gen', 'digest')
if not cur[1] or cur[1] ~= ARGV[2] or (cur[2] or '1') ~= ARGV[1] or (cur[3] or '') ~= ARGV[3] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local t = redis.call('TIME')
local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[5], 'gen', ARGV[1], 'seq', ARGV[2], 'status', 'cold', 'at_ms', now_ms)
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('PEXPIRE', KEYS[5], ttl) else redis.call('PERSIST', KEYS[5]) end
return 1
"""

# KEYS: meta, base, deltas, outbox, mark.
# ARGV: gen, seq, ttl_ms (0 = persist), mark_ttl_ms (0 = persist), base ('' = none),
#       n_meta, n_deltas, n_outbox, meta (field, value)..., deltas..., outbox (field, value)...
# Reply: 1 restored, 0 not cold at this (gen, seq) any more (deleted, reset, already back).
_THAW_LUA = """
local m = redis.call('HMGET', KEYS[5], 'gen', 'seq', 'status')
if m[3] ~= 'cold' or m[1] ~= ARGV[1] or m[2] ~= ARGV[2] or redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local n_meta, n_deltas, n_outbox = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local i = 9
for j = i, i + 2 * n_meta - 1, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
i = i + 2 * n_meta
if ARGV[5] ~= '' then redis.call('SET', KEYS[2], ARGV[5]) end
for j = i, i + n_deltas - 1 do redis.call('RPUSH', KEYS[3], ARGV[j]) end
i = i + n_deltas
for j = i, i + 2 * n_outbox - 1, 2 do redis.call('HSET', KEYS[4], ARGV[j], ARGV[j + 1]) end
local ttl = tonumber(ARGV[3])
for k = 1, 4 do
  if ttl > 0 then redis.call('PEXPIRE', KEYS[k], ttl) else redis.call('PERSIST', KEYS[k]) end
end
redis.call('HSET', KEYS[5], 'status', 'live')
local mttl = tonumber(ARGV[4])
if mttl > 0 then redis.call('PEXPIRE', KEYS[5], mttl) else redis.call('PERSIST', KEYS[5]) end
return 1
"""


@dataclass
class FreezeReport:
    scanned: int = 0
    idle: int = 0
    frozen: int = 0
    changed: int = 0  # advanced between read and delete: left in Redis
    failed: int = 0  # their shard is quarantined: left in Redis
    bytes_moved: int = 0  # payload bytes written to the cold tier
    quarantined: dict[int, str] = field(default_factory=dict)  # shard -> why

    def add(self, other: "FreezeReport") -> None:
        for name in ("idle", "frozen", "changed", "failed", "bytes_moved"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.quarantined.update(other.quarantined)


def _tag(keys: ConversationKeys) -> str:
    return keys.meta.split("{", 1)[1].split("}", 1)[0]


class ColdTier:
    """The cold tier of one namespace: shards of SQLite files under `path` (see cold_store.py)
    and the Redis side of freeze and thaw. SQLite runs in threads, one per shard at a time, so the
    event loop is not blocked and different shards proceed in parallel."""

    def __init__(self, path: str | Path, *, retention_s: float | None = 90 * 24 * 3600, shards: int = DEFAULT_SHARDS,
                 retry_s: float = 60.0) -> None:
        self.files = ColdStore(path, shards=shards, retry_s=retry_s)
        self.path = self.files.path
        # How long a frozen conversation's marker (and so its claim to the row) lives in Redis.
        self.retention_s = retention_s
        self._scripts: dict[int, tuple[Any, Any]] = {}

    @property
    def shards(self) -> int:
        return len(self.files.shards)

    def close(self) -> None:
        self.files.close()

    # --- the files ------------------------------------------------------------------------
    def purge(self, older_than_s: float | None = None) -> int:
        """Drop rows frozen longer ago than `older_than_s` (default: retention_s). Their Redis
        marker (which lives retention_s) is gone by then, so nothing can thaw them any more:
        the conversation's next turn starts a new memory, as after an expiry."""
        age = self.retention_s if older_than_s is None else older_than_s
        if age is None:
            return 0
        return self.files.purge(int((time.time() - age) * 1000))

    def count(self) -> int:
        return self.files.count()

    def checkpoint_wal(self) -> None:
        """Fold the write-ahead logs into the shard files (for size figures and backups)."""
        self.files.checkpoint_wal()

    def file_bytes(self) -> int:
        return self.files.file_bytes()

    def quarantined(self) -> dict[int, str]:
        """Shards that cannot be read now, and why."""
        return self.files.quarantined()

    def get(self, ref: RefLike) -> ColdRecord | None:
        tag = as_ref(ref).tag
        return ColdStore.get(self.files.shard(tag), [tag]).get(tag)

    def why_missing(self, ref: RefLike) -> str | None:
        """Why a frozen conversation could not be thawed, when its shard is quarantined."""
        return self.files.shard(as_ref(ref).tag).broken

    async def _per_shard(self, fn: Any, tags: Sequence[str]) -> dict[int, Any]:
        """`fn(shard, its tags)` for every shard concerned, in parallel threads; a quarantined
        shard's entry is its ShardUnreadable."""
        groups = self.files.by_shard(tags)
        shards: list[Shard] = [self.files.shards[i] for i in groups]
        got = await asyncio.gather(*(asyncio.to_thread(fn, s, groups[s.index]) for s in shards), return_exceptions=True)
        out: dict[int, Any] = {}
        for s, r in zip(shards, got):
            if isinstance(r, BaseException) and not isinstance(r, ShardUnreadable):
                raise r
            out[s.index] = r
        return out

    # --- Redis side ----------------------------------------------------------------------
    def _script(self, store: "MemoryStore") -> tuple[Any, Any]:
        # The store's own client (its retry policy and availability mapping) runs our scripts.
        got = self._scripts.get(id(store))
        if got is None:
            got = (store.redis.register_script(_FREEZE_LUA), store.redis.register_script(_THAW_LUA))
            self._scripts[id(store)] = got
        return got

    def _mark_ttl_ms(self) -> int:
        return 0 if self.retention_s is None else max(1, round(self.retention_s * 1000))

    async def freeze(self, store: "MemoryStore", refs: Sequence[RefLike]) -> FreezeReport:
        """Move these conversations' state out of Redis (those that are live and whole)."""
        return await self._freeze_keys(store, [(as_ref(r), store.keys(as_ref(r))) for r in refs])

    async def _freeze_keys(self, store: "MemoryStore",
                           items: Sequence[tuple[ConversationRef | None, ConversationKeys]]) -> FreezeReport:
        rep = FreezeReport(idle=len(items))
        if not items:
            return rep
        replies = await store.scripts.run(store.scripts.load, [(k, ()) for _, k in items], "cold read")
        recs: dict[str, tuple[ColdRecord, ConversationKeys, bytes]] = {}
        for (ref, keys), reply in zip(items, replies):
            kind, gen, seq, meta_flat, base, deltas, outbox_flat, _mark = reply
            if kind not in (b"live", "live"):
                continue
            meta = {meta_flat[i]: meta_flat[i + 1] for i in range(0, len(meta_flat), 2)}
            tenant = meta.get(b"tenant", b"").decode() or None
            cid = meta.get(b"cid", b"").decode() or (ref.conversation_id if ref else "")
            rec = ColdRecord(_tag(keys), tenant, cid, int(gen), int(seq), list(meta_flat), bytes(base or b""),
                             [bytes(d) for d in deltas], list(outbox_flat))
            recs[rec.tag] = (rec, keys, meta.get(b"digest", b""))
        if not recs:
            return rep
        # durable on disk first, every shard at once
        written = await self._per_shard(lambda s, tags: ColdStore.put(s, [recs[t][0] for t in tags]), list(recs))
        for index, res in written.items():
            if isinstance(res, ShardUnreadable):
                rep.quarantined[index] = str(res)
        ok = [t for t in recs if not isinstance(written[shard_of(t, self.shards)], ShardUnreadable)]
        rep.failed = len(recs) - len(ok)
        if not ok:
            return rep
        freeze, _ = self._script(store)
        mttl = str(self._mark_ttl_ms()).encode()
        done = await store.scripts.run(
            freeze, [(recs[t][1], [str(recs[t][0].gen).encode(), str(recs[t][0].seq).encode(), recs[t][2], mttl])
                     for t in ok], "cold freeze", durable=True)
        changed = [t for t, d in zip(ok, done) if not int(d)]
        if changed:
            await self._per_shard(ColdStore.delete, changed)
        rep.frozen = len(ok) - len(changed)
        rep.changed = len(changed)
        rep.bytes_moved = sum(recs[t][0].nbytes for t, d in zip(ok, done) if int(d))
        return rep

    async def freeze_idle(self, store: "MemoryStore", idle_s: float, *, limit: int | None = None,
                          scan_count: int = 1000, batch: int = 200, concurrency: int = 4,
                          only_shards: set[int] | None = None) -> FreezeReport:
        """Freeze every conversation whose last commit is older than `idle_s` (SCAN over meta
        keys; no blocking command). `limit` bounds how many are frozen in this call;
        `concurrency` batches are in flight at once (Redis round trips of one overlap the SQLite
        writes of another); `only_shards`: leave the other shards' conversations to other freezers."""
        total = FreezeReport()
        cutoff_ms = int((time.time() - idle_s) * 1000)
        pattern = f"{store.namespace}:{{*}}:meta"
        running: set[asyncio.Task] = set()
        pending: list[tuple[ConversationRef | None, ConversationKeys]] = []

        async def drain(until: int) -> None:
            while len(running) > until:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    running.discard(task)
                    total.add(task.result())

        def room() -> int | None:
            return None if limit is None else max(0, limit - total.frozen - batch * len(running))

        async for key in store.redis.scan_iter(match=pattern, count=scan_count):
            k = key.decode() if isinstance(key, bytes) else key
            total.scanned += 1
            prefix = k[: -len("meta")]
            keys = ConversationKeys(k, prefix + "base", prefix + "deltas", prefix + "outbox", prefix + "mark")
            if only_shards is not None and shard_of(_tag(keys), self.shards) not in only_shards:
                continue
            pending.append((None, keys))
            if len(pending) >= batch:
                await drain(concurrency - 1)
                if limit is not None and total.frozen >= limit:
                    break
                running.add(asyncio.create_task(self._freeze_batch(store, pending, cutoff_ms, room())))
                pending = []
        await drain(0)
        if pending and (limit is None or total.frozen < limit):
            total.add(await self._freeze_batch(store, pending, cutoff_ms, room()))
        return total

    async def _freeze_batch(self, store: "MemoryStore", items: list, cutoff_ms: int,
                            room: int | None) -> FreezeReport:
        pipe = store.redis.pipeline(transaction=False)
        for _, k in items:
            pipe.hget(k.meta, "updated_at_ms")
        stamps = await pipe.execute()
        # idle for at least idle_s: a stamp equal to the cutoff counts (idle_s=0 means everything,
        # including what committed within the freeze's own millisecond)
        idle = [it for it, ts in zip(items, stamps) if ts is not None and int(ts) <= cutoff_ms]
        if room is not None:
            idle = idle[:room]
        return await self._freeze_keys(store, idle)

    async def thaw(self, store: "MemoryStore", refs: Sequence[RefLike]) -> int:
        """Restore these conversations into Redis exactly as frozen (called by the store's
        load when it sees `cold`). Returns how many were restored. A conversation whose shard is
        quarantined stays cold (`why_missing` says why)."""
        refs = [as_ref(r) for r in refs]
        by_tag = {r.tag: r for r in refs}
        read = await self._per_shard(ColdStore.get, list(by_tag))
        recs: dict[str, ColdRecord] = {}
        for res in read.values():
            if not isinstance(res, ShardUnreadable):
                recs.update(res)
        calls, tags = [], []
        for tag, ref in by_tag.items():
            rec = recs.get(tag)
            if rec is None:
                continue  # no copy: the store's load reports the conversation (never a silent reset)
            ttl = store.ttl.state_ms(ref.tenant)
            mttl = store.ttl.marker_ms(tenant=ref.tenant)
            args = [str(rec.gen).encode(), str(rec.seq).encode(), str(ttl).encode(), str(mttl).encode(), rec.base,
                    str(len(rec.meta) // 2).encode(), str(len(rec.deltas)).encode(),
                    str(len(rec.outbox) // 2).encode(), *rec.meta, *rec.deltas, *rec.outbox]
            calls.append((store.keys(ref), args))
            tags.append(tag)
        if not calls:
            return 0
        _, thaw = self._script(store)
        done = await store.scripts.run(thaw, calls, "cold thaw", durable=True)
        # Restored, or no longer cold at that (gen, seq) (deleted, reset, restored by another
        # worker): either way the row has served its purpose.
        await self._per_shard(ColdStore.delete, tags)
        return sum(int(x) for x in done)

    async def discard(self, ref: RefLike) -> bool:
        """Forget a conversation's cold copy (on delete / reset). A quarantined shard keeps its
        row: harmless, a thaw needs the marker to still say `cold` at the row's (gen, seq)."""
        tag = as_ref(ref).tag
        res = (await self._per_shard(ColdStore.delete, [tag]))[shard_of(tag, self.shards)]
        return not isinstance(res, ShardUnreadable) and bool(res)


def store_levers(settings: Any) -> dict[str, Any]:
    """MemoryStore keyword arguments of the capacity levers (issue #14), from Settings:
    storage dtype, per-tenant TTLs, cold tier. One place, so every store a worker builds agrees."""
    import torch

    dtype = getattr(settings, "state_storage_dtype", "same")
    path = getattr(settings, "cold_tier_path", None)
    return {
        "storage_dtype": torch.bfloat16 if dtype == "bfloat16" else None,
        "ttl_by_tenant": dict(getattr(settings, "state_ttl_by_tenant", None) or {}),
        "cold": ColdTier(path, shards=getattr(settings, "cold_tier_shards", DEFAULT_SHARDS)) if path else None,
    }
