"""The SQLite + numpy backend of the index: no server, one file. What `evostream sink` and
`evostream search` use when no `sink_dsn` is configured.

Why it stays beside pgvector: it needs nothing installed and nothing running, which is what a
first try on a laptop wants. It keeps the same tables and rules as the PostgreSQL backend
(stream/index/base.py, ops.py) and the same transaction of rows + offsets; what it does not
have is an approximate index: a tenant-wide search is an exact numpy scan of the tenant's
rows (fine for thousands of turns, not for millions: use PostgreSQL).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from stream.index.base import IndexHit, SearchQuery, VectorIndex, check_query, cosine_rank
from stream.index.ops import ConvKey, Plan, TurnRow, tenant_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    tenant TEXT NOT NULL, conversation_id TEXT NOT NULL, generation INTEGER NOT NULL, seq INTEGER NOT NULL,
    document_id TEXT NOT NULL, memory_origin TEXT NOT NULL, checkpoint TEXT NOT NULL, model TEXT NOT NULL,
    memory_len INTEGER NOT NULL, produced_at TEXT NOT NULL, turn_at TEXT NOT NULL, source_partition INTEGER NOT NULL,
    source_offset INTEGER NOT NULL, dim INTEGER NOT NULL, embedding BLOB NOT NULL,
    PRIMARY KEY (tenant, conversation_id, generation, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS texts (
    tenant TEXT NOT NULL, conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (tenant, conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    sink TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (sink, topic, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejects (
    sink TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, record_key BLOB, record_value BLOB,
    PRIMARY KEY (sink, topic, partition, "offset")) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS turns_time ON turns (tenant, turn_at);
"""

_COLS = ("tenant, conversation_id, generation, seq, document_id, memory_origin, checkpoint, model, memory_len, "
         "embedding, produced_at, turn_at, source_partition, source_offset")


def default_index_path(cache_root: Path, bootstrap: str, embeddings_topic: str) -> Path:
    """One file per (broker, topic): a different broker is a different stream."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bootstrap}-{embeddings_topic}")[:180]
    return cache_root / "index" / f"{name}.sqlite"


def _ts(t: datetime) -> str:
    return t.isoformat()


class SqliteIndex(VectorIndex):
    kind = "sqlite"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the sink calls it from worker threads (asyncio.to_thread), one call at a time
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._lock_fh: object | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def dim(self) -> int | None:
        row = self.db.execute("SELECT dim FROM turns LIMIT 1").fetchone()
        return int(row[0]) if row else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def stored_generations(self, convs: set[ConvKey]) -> dict[ConvKey, set[int]]:
        out: dict[ConvKey, set[int]] = {}
        for t, c in convs:
            gens = {r[0] for r in self.db.execute("SELECT DISTINCT generation FROM turns WHERE tenant=? AND "
                                                  "conversation_id=?", (t, c))}
            if gens:
                out[(t, c)] = gens
        return out

    def execute(self, sink: str, plan: Plan) -> None:
        x = self.db.executemany
        x("DELETE FROM turns WHERE tenant=? AND conversation_id=? AND generation=?",
          [(c[0], c[1], g) for c, gens in plan.row_deletes.items() for g in sorted(gens)])
        x("DELETE FROM texts WHERE tenant=? AND conversation_id=?", sorted(plan.text_deletes))
        x("INSERT OR REPLACE INTO turns VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
          [(r.tenant, r.conversation_id, r.generation, r.seq, r.document_id, r.memory_origin, r.checkpoint, r.model,
            r.memory_len, _ts(r.produced_at), _ts(r.turn_at), r.source_partition, r.source_offset,
            int(r.vector.shape[0]), np.asarray(r.vector, dtype="<f4").tobytes()) for r in plan.upserts.values()])
        x("INSERT OR REPLACE INTO texts VALUES (?,?,?,?)", [(k[0], k[1], k[2], v) for k, v in plan.texts.items()])
        x("INSERT OR IGNORE INTO rejects VALUES (?,?,?,?,?,?,?,?)",
          [(sink, r.topic, r.partition, r.offset, r.reason, r.detail, r.key, r.value) for r in plan.rejects])
        x("INSERT OR REPLACE INTO offsets VALUES (?,?,?,?)", [(sink, t, p, n) for (t, p), n in plan.offsets.items()])

    def offsets(self, sink: str) -> dict[tuple[str, int], int]:
        return {(t, p): n for t, p, n in self.db.execute(
            "SELECT topic, partition, next_offset FROM offsets WHERE sink=?", (sink,))}

    def rejects(self, sink: str) -> list[tuple[str, int, int, str]]:
        return [tuple(r) for r in self.db.execute(  # type: ignore[misc]
            'SELECT topic, partition, "offset", reason FROM rejects WHERE sink=? ORDER BY 1, 2, 3', (sink,))]

    def acquire_writer(self, sink: str) -> bool:
        """An advisory lock file beside the index (released when the process dies)."""
        if self._lock_fh is not None:
            return True
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", sink)[:100]
        fh = open(f"{self.path}.{name}.lock", "w")  # noqa: SIM115 - held for the index's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_fh = fh
        return True

    def forget(self, sink: str) -> None:
        with self.transaction():
            for sql in ("DELETE FROM offsets WHERE sink=?", "DELETE FROM rejects WHERE sink=?"):
                self.db.execute(sql, (sink,))
            self.db.execute("DELETE FROM turns")
            self.db.execute("DELETE FROM texts")

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM turns").fetchone()[0])

    def text(self, tenant: str | None, conversation_id: str, seq: int) -> str | None:
        row = self.db.execute("SELECT text FROM texts WHERE tenant=? AND conversation_id=? AND seq=?",
                              (tenant_key(tenant), conversation_id, seq)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _row(r: tuple) -> TurnRow:
        vec = np.frombuffer(r[9], dtype="<f4").astype(np.float32)
        return TurnRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], vec, datetime.fromisoformat(r[10]),
                       datetime.fromisoformat(r[11]), r[12], r[13])

    def rows(self, tenant: str | None = None) -> list[TurnRow]:
        where, args = ("WHERE tenant=?", (tenant_key(tenant),)) if tenant is not None else ("", ())
        return [self._row(r) for r in self.db.execute(
            f"SELECT {_COLS} FROM turns {where} ORDER BY tenant, conversation_id, generation, seq", args)]

    def search(self, q: SearchQuery) -> list[IndexHit]:
        v = check_query(q, self.dim)
        where, args = ["tenant=?", "checkpoint=?"], [tenant_key(q.tenant), q.checkpoint]
        if q.conversation_id is not None:
            where.append("conversation_id=?")
            args.append(q.conversation_id)
        rows = [self._row(r) for r in self.db.execute(f"SELECT {_COLS} FROM turns WHERE {' AND '.join(where)}", args)]
        rows = [r for r in rows if (q.since is None or r.turn_at >= q.since) and (q.until is None or r.turn_at < q.until)]
        ranked = cosine_rank([(r.vector, (r.conversation_id, r.seq, i)) for i, r in enumerate(rows)], v, q.k)
        out = []
        for score, (_cid, _seq, i) in ranked:
            r = rows[i]
            out.append(IndexHit(conversation_id=r.conversation_id, generation=r.generation, seq=r.seq,
                                document_id=r.document_id, score=score, turn_at=r.turn_at,
                                text=self.text(q.tenant, r.conversation_id, r.seq)))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
        if self._lock_fh is not None:
            with contextlib.suppress(Exception):
                self._lock_fh.close()  # type: ignore[attr-defined]
            self._lock_fh = None


__all__ = ["SqliteIndex", "default_index_path"]
