"""Cold tier: idle conversations' checkpoints moved out of Redis to SQLite, brought back exactly.

Why: a conversation's memory is up to a few MiB of Redis RAM (docs/CAPACITY.md), but most
conversations of a large deployment are idle most of the time. RAM is the scarce resource;
disk is not. Moving an idle conversation's keys to an embedded database (SQLite, in the
standard library, one file, nothing to run) and restoring them byte for byte on its next turn
keeps the memory without paying RAM for it.

How it stays safe next to live writers (the checkpoint store's compare-and-set on (gen, seq)):

* freeze = read the conversation (one consistent script read), write the copy to SQLite and
  commit it, THEN a Lua script deletes the Redis keys only if meta still has the same seq,
  generation and commit digest, and sets the marker's status to `cold`. A conversation that
  moved on in between is left alone (its SQLite copy is dropped). A crash between the two
  steps leaves the state in Redis and a stale copy on disk: harmless, never a loss.
* while cold, the store's view of the conversation is `cold` (generation + 1), so a worker
  still holding it in its cache loses its compare-and-set (STALE) and reloads; no writer can
  mistake it for a new conversation.
* thaw (done by `MemoryStore.load_many` when the store has a cold tier) = a Lua script
  restores meta, base, deltas and outbox exactly as they were, only if the marker still says
  `cold` at the same (gen, seq) and no meta exists, refreshes the TTLs like a commit, and sets
  the marker back to `live`; then the SQLite row is dropped. Delete/reset drop the row too.

Entry point (run it from cron or a timer): `python -m stream.state.cold_tier freeze --idle-s 3600`
(reads EVOSTREAM_* settings: Redis URL, namespace, EVOSTREAM_COLD_TIER_PATH);
`python -m stream.state.cold_tier purge` drops rows older than the retention (their markers are gone);
`python -m stream.state.cold_tier stats` prints rows and file size. Workers thaw on their own: a
worker whose EVOSTREAM_COLD_TIER_PATH names the same file restores a frozen conversation when
its next turn arrives (the file must be reachable from every worker: one host, or a shared
volume; a networked store is the next step for a multi-host deployment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.identity import ConversationRef, RefLike, as_ref

if TYPE_CHECKING:
    from stream.state.store import MemoryStore, ConversationKeys

__all__ = ["ColdRecord", "ColdTier", "FreezeReport"]

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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cold (
    tag TEXT PRIMARY KEY,        -- ConversationRef.tag (the Redis hash tag)
    tenant TEXT,                 -- '' = default tenant
    cid TEXT NOT NULL,
    gen INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    frozen_at_ms INTEGER NOT NULL,
    meta BLOB NOT NULL,          -- the meta hash, (field, value) pairs, length-prefixed
    base BLOB NOT NULL,          -- the base string ('' = none)
    deltas BLOB NOT NULL,        -- the delta list, length-prefixed
    outbox BLOB NOT NULL         -- the outbox hash, (field, value) pairs, length-prefixed
);
CREATE INDEX IF NOT EXISTS cold_frozen_at ON cold (frozen_at_ms);
"""


def _pack(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def _unpack(blob: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(blob):
        (n,) = struct.unpack_from("<I", blob, off)
        off += 4
        out.append(bytes(blob[off : off + n]))
        off += n
    if off != len(blob):
        raise ValueError("cold record truncated")
    return out


@dataclass(frozen=True)
class ColdRecord:
    """One conversation's Redis keys, as they were when frozen (raw bytes: restored exactly)."""

    tag: str
    tenant: str | None
    conversation_id: str
    gen: int
    seq: int
    meta: list[bytes]  # flat (field, value) pairs
    base: bytes
    deltas: list[bytes]
    outbox: list[bytes]  # flat (field, value) pairs

    @property
    def nbytes(self) -> int:
        return sum(map(len, self.meta)) + len(self.base) + sum(map(len, self.deltas)) + sum(map(len, self.outbox))


@dataclass
class FreezeReport:
    scanned: int = 0
    idle: int = 0
    frozen: int = 0
    changed: int = 0  # advanced between read and delete: left in Redis
    bytes_moved: int = 0  # payload bytes written to the cold tier


class ColdTier:
    """SQLite file holding frozen conversations (one row each). Thread-safe; the async
    methods run SQLite in a thread so the event loop is not blocked."""

    def __init__(self, path: str | Path, *, retention_s: float | None = 90 * 24 * 3600) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # How long a frozen conversation's marker (and so its claim to the row) lives in Redis.
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._scripts: dict[int, tuple[Any, Any]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- SQLite (sync) -------------------------------------------------------------------
    def _put(self, recs: Sequence[ColdRecord]) -> None:
        now = int(time.time() * 1000)
        rows = [(r.tag, r.tenant or "", r.conversation_id, r.gen, r.seq, now, _pack(r.meta), r.base,
                 _pack(r.deltas), _pack(r.outbox)) for r in recs]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO cold VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")

    def _get(self, tags: Sequence[str]) -> dict[str, ColdRecord]:
        out: dict[str, ColdRecord] = {}
        with self._lock:
            for tag in tags:
                row = self._db.execute(
                    "SELECT tag, tenant, cid, gen, seq, meta, base, deltas, outbox FROM cold WHERE tag = ?",
                    (tag,)).fetchone()
                if row:
                    out[tag] = ColdRecord(row[0], row[1] or None, row[2], row[3], row[4], _unpack(row[5]),
                                          bytes(row[6]), _unpack(row[7]), _unpack(row[8]))
        return out

    def _delete(self, tags: Sequence[str]) -> int:
        with self._lock:
            cur = self._db.executemany("DELETE FROM cold WHERE tag = ?", [(t,) for t in tags])
            return cur.rowcount

    def purge(self, older_than_s: float | None = None) -> int:
        """Drop rows frozen longer ago than `older_than_s` (default: retention_s). Their Redis
        marker (which lives retention_s) is gone by then, so nothing can thaw them any more:
        the conversation's next turn starts a new memory, as after an expiry."""
        age = self.retention_s if older_than_s is None else older_than_s
        if age is None:
            return 0
        cutoff = int((time.time() - age) * 1000)
        with self._lock:
            return self._db.execute("DELETE FROM cold WHERE frozen_at_ms < ?", (cutoff,)).rowcount

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM cold").fetchone()[0])

    def checkpoint_wal(self) -> None:
        """Fold the write-ahead log into the database file (for size figures and backups)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))

    def get(self, ref: RefLike) -> ColdRecord | None:
        return self._get([as_ref(ref).tag]).get(as_ref(ref).tag)

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
                           items: Sequence[tuple[ConversationRef | None, "ConversationKeys"]]) -> FreezeReport:
        rep = FreezeReport(idle=len(items))
        if not items:
            return rep
        replies = await store.scripts.run(store.scripts.load, [(k, ()) for _, k in items], "cold read")
        recs: list[tuple[ColdRecord, "ConversationKeys", bytes]] = []
        for (ref, keys), reply in zip(items, replies):
            kind, gen, seq, meta_flat, base, deltas, outbox_flat, _mark = reply
            if kind not in (b"live", "live"):
                continue
            meta = {meta_flat[i]: meta_flat[i + 1] for i in range(0, len(meta_flat), 2)}
            tag = keys.meta.split("{", 1)[1].split("}", 1)[0]
            tenant = meta.get(b"tenant", b"").decode() or None
            cid = meta.get(b"cid", b"").decode() or (ref.conversation_id if ref else "")
            recs.append((ColdRecord(tag, tenant, cid, int(gen), int(seq), list(meta_flat), bytes(base or b""),
                                    [bytes(d) for d in deltas], list(outbox_flat)),
                         keys, meta.get(b"digest", b"")))
        if not recs:
            return rep
        await asyncio.to_thread(self._put, [r for r, _, _ in recs])  # durable on disk first
        freeze, _ = self._script(store)
        mttl = str(self._mark_ttl_ms()).encode()
        done = await store.scripts.run(
            freeze, [(k, [str(r.gen).encode(), str(r.seq).encode(), d, mttl]) for r, k, d in recs],
            "cold freeze", durable=True)
        changed = [r.tag for (r, _, _), ok in zip(recs, done) if not int(ok)]
        if changed:
            await asyncio.to_thread(self._delete, changed)
        rep.frozen = len(recs) - len(changed)
        rep.changed = len(changed)
        rep.bytes_moved = sum(r.nbytes for (r, _, _), ok in zip(recs, done) if int(ok))
        return rep

    async def freeze_idle(self, store: "MemoryStore", idle_s: float, *, limit: int | None = None,
                          scan_count: int = 1000, batch: int = 200) -> FreezeReport:
        """Freeze every conversation whose last commit is older than `idle_s` (SCAN over meta
        keys; no blocking command). `limit` bounds how many are frozen in this call."""
        total = FreezeReport()
        cutoff_ms = int((time.time() - idle_s) * 1000)
        pattern = f"{store.namespace}:{{*}}:meta"
        from stream.state.store import ConversationKeys  # runtime import: no cycle at import time

        pending: list[tuple[ConversationRef | None, ConversationKeys]] = []
        async for key in store.redis.scan_iter(match=pattern, count=scan_count):
            k = key.decode() if isinstance(key, bytes) else key
            total.scanned += 1
            prefix = k[: -len("meta")]
            pending.append((None, ConversationKeys(k, prefix + "base", prefix + "deltas", prefix + "outbox",
                                                    prefix + "mark")))
            if len(pending) >= batch:
                await self._freeze_batch(store, pending, cutoff_ms, total, limit)
                pending = []
            if limit is not None and total.frozen >= limit:
                break
        if pending and (limit is None or total.frozen < limit):
            await self._freeze_batch(store, pending, cutoff_ms, total, limit)
        return total

    async def _freeze_batch(self, store: "MemoryStore", items: list, cutoff_ms: int,
                            total: FreezeReport, limit: int | None) -> None:
        pipe = store.redis.pipeline(transaction=False)
        for _, k in items:
            pipe.hget(k.meta, "updated_at_ms")
        stamps = await pipe.execute()
        idle = [it for it, ts in zip(items, stamps) if ts is not None and int(ts) < cutoff_ms]
        if limit is not None:
            idle = idle[: max(0, limit - total.frozen)]
        rep = await self._freeze_keys(store, idle)
        total.idle += rep.idle
        total.frozen += rep.frozen
        total.changed += rep.changed
        total.bytes_moved += rep.bytes_moved

    async def thaw(self, store: "MemoryStore", refs: Sequence[RefLike]) -> int:
        """Restore these conversations into Redis exactly as frozen (called by the store's
        load when it sees `cold`). Returns how many were restored."""
        refs = [as_ref(r) for r in refs]
        recs = await asyncio.to_thread(self._get, [r.tag for r in refs])
        calls, tags = [], []
        for ref in refs:
            rec = recs.get(ref.tag)
            if rec is None:
                continue  # no copy: the store's load reports the conversation (never a silent reset)
            ttl = store.ttl.state_ms(ref.tenant)
            mttl = store.ttl.marker_ms(tenant=ref.tenant)
            args = [str(rec.gen).encode(), str(rec.seq).encode(), str(ttl).encode(), str(mttl).encode(), rec.base,
                    str(len(rec.meta) // 2).encode(), str(len(rec.deltas)).encode(),
                    str(len(rec.outbox) // 2).encode(), *rec.meta, *rec.deltas, *rec.outbox]
            calls.append((store.keys(ref), args))
            tags.append(ref.tag)
        if not calls:
            return 0
        _, thaw = self._script(store)
        done = await store.scripts.run(thaw, calls, "cold thaw", durable=True)
        # Restored, or no longer cold at that (gen, seq) (deleted, reset, restored by another
        # worker): either way the row has served its purpose.
        await asyncio.to_thread(self._delete, tags)
        return sum(int(x) for x in done)

    async def discard(self, ref: RefLike) -> bool:
        """Forget a conversation's cold copy (on delete / reset)."""
        return bool(await asyncio.to_thread(self._delete, [as_ref(ref).tag]))


def store_levers(settings: Any) -> dict[str, Any]:
    """MemoryStore keyword arguments of the capacity levers (issue #14), from Settings:
    storage dtype, per-tenant TTLs, cold tier. One place, so every store a worker builds agrees."""
    import torch

    dtype = getattr(settings, "state_storage_dtype", "same")
    path = getattr(settings, "cold_tier_path", None)
    return {
        "storage_dtype": torch.bfloat16 if dtype == "bfloat16" else None,
        "ttl_by_tenant": dict(getattr(settings, "state_ttl_by_tenant", None) or {}),
        "cold": ColdTier(path) if path else None,
    }


# --------------------------------------------------------------------------------------------
# Entry point


def _store_from_settings(settings: Any, cold: ColdTier) -> "MemoryStore":
    import torch

    from stream.state.store import MemoryStore
    from stream.state.redis_client import RedisOptions

    # freeze/thaw move raw bytes: model shape and fingerprint are not needed to move them.
    return MemoryStore(settings.redis_url, fingerprint="cold-tier", hidden_size=1, capacity=1,
                           dtype=torch.float32, namespace=settings.redis_namespace,
                           ttl_s=settings.state_ttl_s, marker_ttl_s=settings.marker_ttl_s,
                           ttl_by_tenant=getattr(settings, "state_ttl_by_tenant", None), cold=cold,
                           redis_options=RedisOptions.from_settings(settings))  # issue #8


async def _amain(args: argparse.Namespace) -> dict[str, Any]:
    from stream.settings import Settings

    settings = Settings()
    path = args.path or getattr(settings, "cold_tier_path", None)
    if not path:
        raise SystemExit("no cold tier: pass --path or set EVOSTREAM_COLD_TIER_PATH")
    cold = ColdTier(path)
    store = _store_from_settings(settings, cold)
    try:
        if args.cmd == "freeze":
            rep = await cold.freeze_idle(store, args.idle_s, limit=args.limit)
            return {**rep.__dict__, "cold_rows": cold.count(), "cold_file_bytes": cold.file_bytes()}
        if args.cmd == "purge":
            return {"purged": cold.purge(), "cold_rows": cold.count(), "cold_file_bytes": cold.file_bytes()}
        return {"cold_rows": cold.count(), "cold_file_bytes": cold.file_bytes()}
    finally:
        await store.close()
        cold.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stream.state.cold_tier", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("freeze", help="move conversations idle for --idle-s out of Redis")
    f.add_argument("--idle-s", type=float, required=True, help="idle time (seconds since the last commit)")
    f.add_argument("--limit", type=int, default=None, help="freeze at most this many")
    f.add_argument("--path", default=None, help="SQLite file (default: EVOSTREAM_COLD_TIER_PATH)")
    pg = sub.add_parser("purge", help="drop rows older than the retention (their markers are gone)")
    pg.add_argument("--path", default=None, help="SQLite file (default: EVOSTREAM_COLD_TIER_PATH)")
    s = sub.add_parser("stats", help="rows and file size of the cold tier")
    s.add_argument("--path", default=None, help="SQLite file (default: EVOSTREAM_COLD_TIER_PATH)")
    print(json.dumps(asyncio.run(_amain(p.parse_args(argv)))))


if __name__ == "__main__":
    main()
