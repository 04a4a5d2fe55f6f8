"""The persistent reference index: turn embeddings and turn texts on disk (SQLite), scoped by
(tenant, conversation), fed from the embeddings and turns topics with their offsets.

Why SQLite + numpy rather than qdrant-client's embedded mode (both are installed; picked by
measurement, BENCHMARKS.md "Reference index"): a search here is always within ONE
conversation (a few to a few thousand turns), so an exact scan of that conversation's rows is
both the right answer and cheap, and SQLite gives the one thing the index needs above all: the
rows and the topic offsets they came from committed in ONE transaction. On this machine
qdrant's local mode took 40 points/s to fill and ~0.5 s per filtered search at 10k points,
and keeps offsets nowhere.

What the index holds:
* `turns`: (tenant, conversation_id, seq) -> vector (float32, unit length), checkpoint, dim.
  Re-adding a key replaces it (the topic is at-least-once; copies are identical by contract).
* `texts`: (tenant, conversation_id, seq) -> "user: ...\\nassistant: ..." from the turns
  topic (the embeddings carry no text), only for records whose key is their conversation id.
* `offsets`: (topic, partition) -> next offset to read. Written with the rows of the same
  batch, so a restart resumes exactly where the index is (no gap, no double work).
* A `conversation_deleted` tombstone (embeddings topic) drops the conversation's vectors; a
  `delete` (turns topic) drops its texts. Each topic is keyed by conversation id, so a
  conversation's records and its tombstone share a partition and arrive in order: what comes
  after a tombstone is the conversation's next life.

A topic recreated since the last read (a local stack restart) is detected by re-reading the
last record the index applied in each partition (its hash is stored with the offset; applying
it again is idempotent): when it is not there any more, that topic's rows and offsets are
dropped and it is read again from the start. (Broker end offsets cannot tell: the local
broker reports the last batch's base offset + 1 and answers a fetch past the end with nothing.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from schemas.events import ConversationDeleted, EmbeddingEvent, SearchHit
from schemas.vectors import decode_vector

if TYPE_CHECKING:
    from stream.kafka.security import KafkaSecurity

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    tenant TEXT NOT NULL, conversation_id TEXT NOT NULL, seq INTEGER NOT NULL,
    checkpoint TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL, memory_len INTEGER NOT NULL,
    PRIMARY KEY (tenant, conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS texts (
    tenant TEXT NOT NULL, conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (tenant, conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, last_hash TEXT NOT NULL,
    PRIMARY KEY (topic, partition)) WITHOUT ROWID;
"""


def record_hash(value: bytes | None) -> str:
    return hashlib.sha1(value or b"").hexdigest()


def _track(last: dict[int, tuple[int, str]], partition: int, offset: int, value: bytes | None) -> None:
    if offset > last.get(partition, (-1, ""))[0]:
        last[partition] = (offset, record_hash(value))


def _t(tenant: str | None) -> str:
    return tenant or ""  # the default tenant; a named tenant is never "" (ConversationRef forbids it)


def default_index_path(cache_root: Path, bootstrap: str, embeddings_topic: str) -> Path:
    """One file per (broker, topic): a different broker is a different stream."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bootstrap}-{embeddings_topic}")[:180]
    return cache_root / "index" / f"{name}.sqlite"


@dataclass
class ApplyStats:
    embeddings: int = 0
    texts: int = 0
    deletes: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skipped_reasons[reason] = self.skipped_reasons.get(reason, 0) + 1


def render_turn_text(messages: Any) -> str | None:
    """The text of a turn event's messages, one "role: content" line each."""
    if not isinstance(messages, list):
        return None
    lines = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("role"), str):
            content = m.get("content")
            lines.append(f"{m['role']}: {content if isinstance(content, str) else json.dumps(content)}")
    return "\n".join(lines) or None


class ReferenceIndex:
    """The on-disk index (one SQLite file). Not thread-safe: one owner at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "ReferenceIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- offsets -----------------------------------------------------------------------------
    def offsets(self, topic: str) -> dict[int, int]:
        return dict(self.db.execute("SELECT partition, next_offset FROM offsets WHERE topic=?", (topic,)).fetchall())

    def anchors(self, topic: str) -> dict[int, tuple[int, str]]:
        """{partition: (next offset, hash of the record at next offset - 1)}."""
        return {p: (n, h) for p, n, h in self.db.execute(
            "SELECT partition, next_offset, last_hash FROM offsets WHERE topic=?", (topic,))}

    def forget_topic(self, topic: str, *, texts: bool) -> None:
        """The topic was recreated: drop what came from it, read it again from the start."""
        with self.db:
            self.db.execute("DELETE FROM offsets WHERE topic=?", (topic,))
            self.db.execute("DELETE FROM texts" if texts else "DELETE FROM turns")

    # -- updates -----------------------------------------------------------------------------
    def apply_embeddings(self, topic: str, records: Iterable[tuple[int, int, bytes | None]]) -> ApplyStats:
        """Apply embeddings-topic records (partition, offset, value) and their offsets, in one
        transaction. Unparseable records are counted and skipped, never fatal."""
        from stream.index.indexer import parse_outbound

        st = ApplyStats()
        last: dict[int, tuple[int, str]] = {}
        with self.db:
            for partition, offset, value in records:
                _track(last, partition, offset, value)
                try:
                    ev = parse_outbound(value)
                except ValueError as exc:
                    st.skip(str(exc).split(":")[0])
                    continue
                if isinstance(ev, EmbeddingEvent):
                    vec = np.asarray(decode_vector(ev.vector), dtype=np.float32)
                    norm = float(np.linalg.norm(vec))
                    if norm > 0:
                        vec = vec / norm
                    self.db.execute("INSERT OR REPLACE INTO turns VALUES (?,?,?,?,?,?,?)",
                                    (_t(ev.tenant), ev.conversation_id, ev.seq, ev.checkpoint, int(vec.shape[0]),
                                     vec.astype("<f4").tobytes(), ev.memory_len))
                    st.embeddings += 1
                elif isinstance(ev, ConversationDeleted):
                    self.db.execute("DELETE FROM turns WHERE tenant=? AND conversation_id=?",
                                    (_t(ev.tenant), ev.conversation_id))
                    st.deletes += 1
            self._save_offsets(topic, last)
        return st

    def apply_turns(self, topic: str, records: Iterable[tuple[int, int, bytes | None, bytes | None]]) -> ApplyStats:
        """Apply turns-topic records (partition, offset, key, value): texts of turns whose key
        is their conversation id, deletes; everything else is not the index's business."""
        st = ApplyStats()
        last: dict[int, tuple[int, str]] = {}
        with self.db:
            for partition, offset, key, value in records:
                _track(last, partition, offset, value)
                try:
                    obj = json.loads(value) if value else None
                except ValueError:
                    st.skip("invalid_json")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("conversation_id"), str):
                    st.skip("not_a_turn")
                    continue
                cid, tenant = obj["conversation_id"], obj.get("tenant")
                if key is None or key.decode("utf-8", "replace") != cid or not (tenant is None or isinstance(tenant, str)):
                    st.skip("key_mismatch")
                    continue
                if obj.get("type") == "delete":
                    self.db.execute("DELETE FROM texts WHERE tenant=? AND conversation_id=?", (_t(tenant), cid))
                    st.deletes += 1
                elif obj.get("type") == "turn" and isinstance(obj.get("seq"), int):
                    text = render_turn_text(obj.get("messages"))
                    if text is None:
                        st.skip("no_text")
                        continue
                    self.db.execute("INSERT OR REPLACE INTO texts VALUES (?,?,?,?)", (_t(tenant), cid, obj["seq"], text))
                    st.texts += 1
                else:
                    st.skip("not_a_turn")
            self._save_offsets(topic, last)
        return st

    def _save_offsets(self, topic: str, last: dict[int, tuple[int, str]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO offsets VALUES (?,?,?,?)",
                            [(topic, p, off + 1, h) for p, (off, h) in last.items()])

    # -- reads -------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM turns").fetchone()[0])

    def seqs(self, tenant: str | None, conversation_id: str) -> list[int]:
        return [r[0] for r in self.db.execute(
            "SELECT seq FROM turns WHERE tenant=? AND conversation_id=? ORDER BY seq", (_t(tenant), conversation_id))]

    def text(self, tenant: str | None, conversation_id: str, seq: int) -> str | None:
        row = self.db.execute("SELECT text FROM texts WHERE tenant=? AND conversation_id=? AND seq=?",
                              (_t(tenant), conversation_id, seq)).fetchone()
        return row[0] if row else None

    def search(self, tenant: str | None, conversation_id: str, query_vector: np.ndarray, k: int = 5, *,
               checkpoint: str | None = None) -> list[SearchHit]:
        """The `k` turns of the conversation most similar (cosine) to the query, best first,
        equal scores in seq order, each with its text when the turns topic had it. With
        `checkpoint`, vectors from another model checkpoint are left out (not comparable)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        if not np.isfinite(q).all():
            raise ValueError("query vector contains NaN or infinite values")
        rows = self.db.execute(
            "SELECT t.seq, t.checkpoint, t.dim, t.vector, x.text FROM turns t LEFT JOIN texts x "
            "ON x.tenant=t.tenant AND x.conversation_id=t.conversation_id AND x.seq=t.seq "
            "WHERE t.tenant=? AND t.conversation_id=?", (_t(tenant), conversation_id)).fetchall()
        if checkpoint is not None:
            other = sum(1 for r in rows if r[1] != checkpoint)
            if other:
                log.warning("search %s: %d turns embedded by another checkpoint than %s left out", conversation_id,
                            other, checkpoint)
            rows = [r for r in rows if r[1] == checkpoint]
        if not rows:
            return []
        wrong = [r[0] for r in rows if r[2] != q.shape[0]]
        if wrong:
            raise ValueError(f"query vector has dim {q.shape[0]} but conversation {conversation_id!r} holds "
                             f"vectors of another dim (seqs {wrong[:5]})")
        mat = np.frombuffer(b"".join(r[3] for r in rows), dtype="<f4").reshape(len(rows), q.shape[0])
        qn = float(np.linalg.norm(q))
        scores = (mat @ q) / qn if qn > 0 else np.zeros(len(rows), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: (-float(scores[i]), rows[i][0]))[:k]
        return [SearchHit(seq=rows[i][0], score=float(np.clip(scores[i], -1.0, 1.0)), text=rows[i][4]) for i in order]


# ---------------------------------------------------------------------------------------------
@dataclass
class CatchUp:
    embeddings: ApplyStats
    texts: ApplyStats
    seconds: float


async def catch_up(index: ReferenceIndex, bootstrap: str, embeddings_topic: str, turns_topic: str | None, *,
                   security: KafkaSecurity | None = None, max_wait_s: float = 120.0, idle_ms: int = 1000) -> CatchUp:
    """Read both topics from the index's offsets until nothing more arrives for `idle_ms` (no
    consumer group: the index's own offsets are the position), applying each fetched batch in
    one transaction; a recreated topic is read again from the start (see the module doc)."""
    t0 = time.monotonic()
    stats = {"emb": ApplyStats(), "txt": ApplyStats()}
    for attempt in range(2):
        recreated = await _catch_up_once(index, bootstrap, embeddings_topic, turns_topic, security, max_wait_s,
                                         idle_ms, stats)
        if not recreated:
            break
        for t in recreated:
            log.warning("index: topic %s was recreated since the last read: reading it again from the start", t)
            index.forget_topic(t, texts=(t != embeddings_topic))
    return CatchUp(stats["emb"], stats["txt"], time.monotonic() - t0)


async def _catch_up_once(index: ReferenceIndex, bootstrap: str, embeddings_topic: str, turns_topic: str | None,
                         security: KafkaSecurity | None, max_wait_s: float, idle_ms: int,
                         stats: dict[str, ApplyStats]) -> set[str]:
    from aiokafka import TopicPartition

    from stream.index.indexer import TopicNotFound

    # fetch_max_wait_ms: the local broker holds every fetch that long; the idle check waits on it
    from stream.clients.produce_stream import start_consumer

    c = await start_consumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             client_id=f"evostream-index-{uuid.uuid4().hex[:6]}", fetch_max_wait_ms=100,
                             **(security.client_kwargs() if security is not None else {}))
    try:
        existing = await c.topics()  # listing: a named metadata request would auto-create on tansu
        if embeddings_topic not in existing:
            raise TopicNotFound(f"topic {embeddings_topic!r} does not exist on the broker at {bootstrap}")
        topics = [embeddings_topic] + ([turns_topic] if turns_topic and turns_topic in existing else [])
        tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
        c.assign(tps)
        # A hint only (the local broker reports the last batch's base offset + 1): reading past
        # it ends the catch-up early; otherwise `idle_ms` without records does.
        ends = await c.end_offsets(tps)
        unverified: dict[TopicPartition, tuple[int, str]] = {}
        for t in topics:
            anchors = index.anchors(t)
            for tp in (tp for tp in tps if tp.topic == t):
                nxt, h = anchors.get(tp.partition, (0, ""))
                if nxt > 0:  # start at the last applied record, to check that it is still there
                    unverified[tp] = (nxt - 1, h)
                c.seek(tp, max(0, nxt - 1))
        recreated: set[str] = set()
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=idle_ms, max_records=2000)
            if not batch:
                break
            emb, txt = [], []
            for tp, ms in batch.items():
                if tp in unverified:
                    off, h = unverified.pop(tp)
                    if ms[0].offset != off or record_hash(ms[0].value) != h:
                        recreated.add(tp.topic)
                    ms = ms[1:]  # the anchor itself was applied before
                if tp.topic in recreated:
                    continue
                if tp.topic == embeddings_topic:
                    emb.extend((tp.partition, m.offset, m.value) for m in ms)
                else:
                    txt.extend((tp.partition, m.offset, m.key, m.value) for m in ms)
            if emb:
                _merge(stats["emb"], index.apply_embeddings(embeddings_topic, emb))
            if txt:
                _merge(stats["txt"], index.apply_turns(turns_topic or "", txt))
            if not unverified and all([(await c.position(tp)) >= ends[tp] for tp in tps]):
                break
        else:
            log.warning("index: still receiving records after %.0fs; returning", max_wait_s)
        # a partition whose last applied record never came back is gone (the topic was recreated)
        recreated |= {tp.topic for tp in unverified}
        return recreated
    finally:
        await c.stop()


def _merge(into: ApplyStats, new: ApplyStats) -> None:
    into.embeddings += new.embeddings
    into.texts += new.texts
    into.deletes += new.deletes
    into.skipped += new.skipped
    for k, v in new.skipped_reasons.items():
        into.skipped_reasons[k] = into.skipped_reasons.get(k, 0) + v


async def search_indexed(index: ReferenceIndex, bootstrap: str, embeddings_topic: str, turns_topic: str | None,
                         worker_url: str, conversation_id: str, text: str, k: int = 5, *,
                         security: KafkaSecurity | None = None, api_key: str | None = None,
                         tenant: str | None = None, timeout: float = 30.0) -> tuple[list[SearchHit], CatchUp]:
    """Catch the index up (only what is new since the last call), embed the query on the
    worker against the conversation's live memory, search the conversation's turns."""
    from stream.clients.query_client import query_worker_async, together

    caught, resp = await together(
        catch_up(index, bootstrap, embeddings_topic, turns_topic, security=security, max_wait_s=timeout * 4),
        query_worker_async(worker_url, conversation_id, text, k=k, timeout=timeout, api_key=api_key, tenant=tenant,
                           unknown_conversation="memoryless"))
    hits = index.search(tenant, conversation_id, decode_vector(resp.vector), k, checkpoint=resp.checkpoint)
    return hits, caught


__all__ = ["ApplyStats", "CatchUp", "ReferenceIndex", "catch_up", "default_index_path", "render_turn_text",
           "search_indexed"]
