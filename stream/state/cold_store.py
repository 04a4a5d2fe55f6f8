"""Where the cold tier's bytes live: SQLite files, sharded by conversation, each one failing alone.

Why shards: one SQLite file takes one writer at a time, so a single file freezes one conversation
after another (~56 ms each at the 0.8B shape: about 15 hours per million), and one bad file held
every frozen conversation. A conversation's shard is fixed by its tag (`shard_of`: a hash, so
conversations spread evenly whatever their ids), the shards are written in parallel (the GIL is
released inside SQLite), and several freezer processes can share the work by shard
(`evostream cold-tier freeze --shards 0-7`). The layout (number of shards, hash) is recorded in a
manifest when the directory is created and read back from it afterwards: a different configured
count never re-homes existing rows.

Why a bad file must not stop the worker (issue #17 item 2): an overwritten or truncated shard
used to raise `database disk image is malformed` in the middle of a batch (exit 70), and again at
the next start (`file is not a database`), so every partition stopped. Now a shard that SQLite
calls corrupt or not a database is *quarantined*: its conversations cannot be thawed (their
turns are dead-lettered `checkpoint_corrupt`, naming the file and SQLite's words), nothing is
written to it, every other shard and every live conversation go on. It is tried again after
`retry_s`, so a file restored from a backup is picked up without a restart. Transient errors
(a lock held by another process beyond the busy timeout) are not quarantined: they raise.

A path that is an existing SQLite *file* (the layout before sharding) is read and written as a
single shard, so an existing cold tier keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST = "cold-tier.json"
LAYOUT = "blake2b-64(tag) mod shards"
DEFAULT_SHARDS = 16

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


def shard_of(tag: str, shards: int) -> int:
    """The shard holding conversation `tag` (stable across processes and versions)."""
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little") % shards


class ShardUnreadable(RuntimeError):
    """A shard is quarantined: SQLite says its file is corrupt or not a database."""


def _is_corruption(exc: sqlite3.Error) -> bool:
    if isinstance(exc, sqlite3.OperationalError):  # locks and busy are transient; I/O and open errors are not
        msg = str(exc).lower()
        return "disk i/o" in msg or "unable to open" in msg or "malformed" in msg or "not a database" in msg
    return isinstance(exc, sqlite3.DatabaseError)


class Shard:
    """One SQLite file: opened lazily, used under its own lock, quarantined on corruption."""

    def __init__(self, index: int, path: Path, retry_s: float) -> None:
        self.index, self.path, self.retry_s = index, path, retry_s
        self.lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.broken: str | None = None
        self._broken_at = 0.0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(connection)` under the shard's lock; ShardUnreadable if the file is quarantined."""
        with self.lock:
            if self.broken is not None:
                if time.monotonic() - self._broken_at < self.retry_s:
                    raise ShardUnreadable(self.broken)
                self.broken = None  # retry: the file may have been restored
            try:
                if self._db is None:
                    self._db = self._open()
                return fn(self._db)
            except sqlite3.Error as exc:
                if not _is_corruption(exc):
                    raise
                self._quarantine(exc)
                raise ShardUnreadable(self.broken) from exc

    def _quarantine(self, exc: sqlite3.Error) -> None:
        self.broken = f"cold-tier shard {self.path} is unreadable ({exc}); quarantined until the file is repaired"
        self._broken_at = time.monotonic()
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        log.error("%s", self.broken)

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class ColdStore:
    """The shards of one cold tier (see module docstring). Thread-safe: each shard has its lock,
    so different shards are read and written at the same time."""

    def __init__(self, path: str | Path, *, shards: int = DEFAULT_SHARDS, retry_s: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.is_file():  # the layout before sharding: one file, one shard
            self.shards = [Shard(0, self.path, retry_s)]
            return
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / MANIFEST
        n = shards
        if manifest.is_file():
            try:
                n = int(json.loads(manifest.read_text())["shards"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{manifest} is not a cold-tier manifest: {exc}") from exc
            if n != shards:
                log.warning("cold tier %s has %d shards (its manifest); %d configured: using %d", self.path, n, shards, n)
        else:
            if shards < 1:
                raise ValueError("a cold tier needs at least one shard")
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"shards": n, "layout": LAYOUT}) + "\n")
            tmp.replace(manifest)
        self.shards = [Shard(i, self.path / f"shard-{i:03d}-of-{n:03d}.sqlite", retry_s) for i in range(n)]

    def shard(self, tag: str) -> Shard:
        return self.shards[shard_of(tag, len(self.shards))]

    def by_shard(self, tags: Sequence[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for tag in tags:
            out.setdefault(shard_of(tag, len(self.shards)), []).append(tag)
        return out

    def quarantined(self) -> dict[int, str]:
        return {s.index: s.broken for s in self.shards if s.broken is not None}

    # --- one shard at a time (callers run shards in parallel threads) -------------------
    @staticmethod
    def put(shard: Shard, recs: Sequence[ColdRecord]) -> None:
        now = int(time.time() * 1000)
        rows = [(r.tag, r.tenant or "", r.conversation_id, r.gen, r.seq, now, _pack(r.meta), r.base,
                 _pack(r.deltas), _pack(r.outbox)) for r in recs]

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO cold VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # a corrupt file may refuse the rollback too: the error below says why
                raise

        shard.run(write)

    @staticmethod
    def get(shard: Shard, tags: Sequence[str]) -> dict[str, ColdRecord]:
        def read(db: sqlite3.Connection) -> dict[str, ColdRecord]:
            out: dict[str, ColdRecord] = {}
            for tag in tags:
                row = db.execute("SELECT tag, tenant, cid, gen, seq, meta, base, deltas, outbox FROM cold WHERE tag = ?",
                                 (tag,)).fetchone()
                if row:
                    out[tag] = ColdRecord(row[0], row[1] or None, row[2], row[3], row[4], _unpack(row[5]),
                                          bytes(row[6]), _unpack(row[7]), _unpack(row[8]))
            return out

        return shard.run(read)

    @staticmethod
    def delete(shard: Shard, tags: Sequence[str]) -> int:
        return shard.run(lambda db: db.executemany("DELETE FROM cold WHERE tag = ?", [(t,) for t in tags]).rowcount)

    # --- every shard ----------------------------------------------------------------------
    def each(self, fn: Callable[[sqlite3.Connection], T]) -> list[T]:
        """`fn` on every readable shard (quarantined ones are skipped: see `quarantined`; a shard
        whose file was never created holds nothing and is not created by looking at it)."""
        out = []
        for s in self.shards:
            if not s.path.exists():
                continue
            try:
                out.append(s.run(fn))
            except ShardUnreadable:
                continue
        return out

    def count(self) -> int:
        return sum(self.each(lambda db: int(db.execute("SELECT COUNT(*) FROM cold").fetchone()[0])))

    def purge(self, cutoff_ms: int) -> int:
        return sum(self.each(lambda db: db.execute("DELETE FROM cold WHERE frozen_at_ms < ?", (cutoff_ms,)).rowcount))

    def checkpoint_wal(self) -> None:
        self.each(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for s in self.shards for p in s.path.parent.glob(s.path.name + "*"))

    def close(self) -> None:
        for s in self.shards:
            s.close()
