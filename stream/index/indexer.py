"""The small reference indexer a downstream team would build on the embeddings topic.

* `VectorIndex`: in memory, per conversation, keyed by (conversation_id, seq). The topic is
  at-least-once, so re-adding a key replaces the entry (same vector by contract) instead of
  adding a second one: replays and duplicates are harmless. `apply_delete` drops a
  conversation when its `conversation_deleted` tombstone arrives. `search` ranks a
  conversation's turns by cosine similarity to a query vector, ties broken by seq (lower
  first), and only compares vectors from the same model checkpoint (vectors from different
  checkpoints are not comparable).
* `IndexerConsumer`: aiokafka consumer that feeds a `VectorIndex` from the embeddings topic,
  either from the beginning of every partition (no consumer group, the default: an in-memory
  index has to be rebuilt on every start anyway) or as a member of its own consumer group
  (offsets committed after each applied batch: what an indexer with a *durable* index does).
  Records it cannot parse are logged, counted and skipped; it never crashes on input.
* `search_end_to_end`: consume the topic into a fresh index, ask a worker for the query
  vector (`POST /v1/embeddings`), search. This is `evostream search`.

Ordering note: the embeddings topic is keyed by conversation id, so a conversation's
embeddings and its tombstone share a partition and arrive in the order they were emitted.
An embedding read *after* a tombstone therefore belongs to the conversation's new life
(the same id used again) and is indexed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from schemas.events import OUTBOUND_EVENT_ADAPTER, ConversationDeleted, EmbeddingEvent, SearchHit
from schemas.vectors import decode_vector
from stream.kafka.security import KafkaSecurity

log = logging.getLogger(__name__)

TextMap = Mapping[tuple[str, int], str]


# ---------------------------------------------------------------------------------------------
@dataclass
class IndexEntry:
    seq: int
    vector: np.ndarray      # float32, unit length (zero vectors stay zero)
    checkpoint: str
    memory_len: int


@dataclass
class IndexStats:
    added: int = 0            # new (conversation, seq) keys
    replaced: int = 0         # re-adds of a key already held (duplicates / replays)
    deletes: int = 0          # tombstones applied
    removed: int = 0          # entries removed by tombstones


class VectorIndex:
    """In-memory cosine index of turn embeddings, per conversation."""

    def __init__(self) -> None:
        self._convs: dict[str, dict[int, IndexEntry]] = {}
        self.stats = IndexStats()

    # -- updates -----------------------------------------------------------------------------
    def add(self, event: EmbeddingEvent) -> bool:
        """Index one embedding; True if the (conversation, seq) key is new."""
        vec = decode_vector(event.vector)
        norm = float(np.linalg.norm(vec))
        if norm > 0:
            vec = vec / norm
        entries = self._convs.setdefault(event.conversation_id, {})
        new = event.seq not in entries
        entries[event.seq] = IndexEntry(event.seq, vec.astype(np.float32, copy=False), event.checkpoint,
                                        event.memory_len)
        if new:
            self.stats.added += 1
        else:
            self.stats.replaced += 1
        return new

    def apply_delete(self, event: ConversationDeleted) -> int:
        """Drop the conversation; returns the number of entries removed."""
        removed = len(self._convs.pop(event.conversation_id, {}))
        self.stats.deletes += 1
        self.stats.removed += removed
        return removed

    def apply(self, event: EmbeddingEvent | ConversationDeleted) -> None:
        if isinstance(event, EmbeddingEvent):
            self.add(event)
        else:
            self.apply_delete(event)

    # -- reads -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(e) for e in self._convs.values())

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        cid, seq = key
        return seq in self._convs.get(cid, {})

    def conversations(self) -> list[str]:
        return list(self._convs)

    def seqs(self, conversation_id: str) -> list[int]:
        return sorted(self._convs.get(conversation_id, {}))

    def get(self, conversation_id: str, seq: int) -> IndexEntry | None:
        return self._convs.get(conversation_id, {}).get(seq)

    def search(self, conversation_id: str, query_vector: np.ndarray, k: int = 5, *, checkpoint: str | None = None,
               texts: TextMap | None = None) -> list[SearchHit]:
        """The `k` turns of `conversation_id` most similar (cosine) to `query_vector`, best first;
        equal scores in seq order. With `checkpoint`, entries embedded by another checkpoint are
        left out. `texts` ({(conversation_id, seq): text}) attaches the turn text to hits."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        entries = self._convs.get(conversation_id)
        if not entries:
            return []
        q = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        if not np.isfinite(q).all():
            raise ValueError("query vector contains NaN or infinite values")
        pool = [e for e in entries.values() if checkpoint is None or e.checkpoint == checkpoint]
        skipped = len(entries) - len(pool)
        if skipped:
            log.warning("search %s: %d entries embedded by another checkpoint than %s left out",
                        conversation_id, skipped, checkpoint)
        wrong_dim = [e.seq for e in pool if e.vector.shape[0] != q.shape[0]]
        if wrong_dim:
            raise ValueError(f"query vector has dim {q.shape[0]} but conversation {conversation_id!r} holds "
                             f"vectors of another dim (seqs {wrong_dim[:5]})")
        if not pool:
            return []
        qn = float(np.linalg.norm(q))
        mat = np.stack([e.vector for e in pool])
        scores = (mat @ q) / qn if qn > 0 else np.zeros(len(pool), dtype=np.float32)
        order = sorted(range(len(pool)), key=lambda i: (-float(scores[i]), pool[i].seq))[:k]
        return [SearchHit(seq=pool[i].seq, score=float(np.clip(scores[i], -1.0, 1.0)),
                          text=texts.get((conversation_id, pool[i].seq)) if texts is not None else None)
                for i in order]


# ---------------------------------------------------------------------------------------------
def parse_outbound(value: bytes | None) -> EmbeddingEvent | ConversationDeleted:
    """Decode one embeddings-topic record; raises ValueError with a short reason."""
    if value is None:
        raise ValueError("null value")
    try:
        return OUTBOUND_EVENT_ADAPTER.validate_json(value)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValueError(f"{first.get('type', 'invalid')}{' at ' + where if where else ''}: "
                         f"{first.get('msg', str(exc))}"[:300]) from None


@dataclass
class ConsumerStats:
    records: int = 0
    embeddings: int = 0
    deletes: int = 0
    skipped: int = 0
    skipped_reasons: Counter = field(default_factory=Counter)


class TopicNotFound(RuntimeError):
    pass


class IndexerConsumer:
    """Feeds a `VectorIndex` from the embeddings topic.

    group_id=None (default): assign every partition and read from the beginning, no commits.
    group_id="...": join that consumer group, start from committed offsets (earliest when none)
    and commit after each applied batch.
    """

    def __init__(self, bootstrap: str, topic: str, index: VectorIndex | None = None, *, group_id: str | None = None,
                 session_timeout_ms: int = 6000, heartbeat_interval_ms: int = 1000,
                 on_event: Callable[[EmbeddingEvent | ConversationDeleted], None] | None = None,
                 security: KafkaSecurity | None = None):
        self.bootstrap = bootstrap
        self.security = security
        self.topic = topic
        self.index = index if index is not None else VectorIndex()
        self.group_id = group_id
        self.on_event = on_event
        self.stats = ConsumerStats()
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        if self._consumer is not None:
            return
        kw: dict = dict(bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                        client_id=f"evostream-indexer-{uuid.uuid4().hex[:6]}")
        if self.security is not None:
            kw.update(self.security.client_kwargs())
        if self.group_id is not None:
            kw.update(group_id=self.group_id, session_timeout_ms=self._session_timeout_ms,
                      heartbeat_interval_ms=self._heartbeat_interval_ms)
        c = AIOKafkaConsumer(**kw)
        await c.start()
        try:
            # An all-topics metadata request: asking for the topic by name would make some
            # brokers (tansu) auto-create it.
            if self.topic not in await c.topics():
                raise TopicNotFound(f"topic {self.topic!r} does not exist on the broker at {self.bootstrap}")
            if self.group_id is None:
                parts = c.partitions_for_topic(self.topic) or set()
                tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
                c.assign(tps)
                await c.seek_to_beginning(*tps)
            else:
                c.subscribe([self.topic])
        except BaseException:
            await c.stop()
            raise
        self._consumer = c

    async def stop(self) -> None:
        if self._consumer is not None:
            c, self._consumer = self._consumer, None
            await c.stop()

    async def __aenter__(self) -> "IndexerConsumer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def assigned(self) -> bool:
        return self._consumer is not None and bool(self._consumer.assignment())

    def handle(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """Apply one record to the index (never raises for bad input)."""
        self.stats.records += 1
        try:
            ev = parse_outbound(value)
        except ValueError as exc:
            reason = str(exc)
            self.stats.skipped += 1
            self.stats.skipped_reasons[reason.split(":")[0]] += 1
            log.warning("indexer: skipped %s/%d@%d: %s", topic, partition, offset, reason)
            return
        self.index.apply(ev)
        if isinstance(ev, EmbeddingEvent):
            self.stats.embeddings += 1
        else:
            self.stats.deletes += 1
        if self.on_event is not None:
            self.on_event(ev)

    async def poll(self, timeout_ms: int = 500) -> int:
        """One fetch: apply what arrived within `timeout_ms`; returns the number of records."""
        if self._consumer is None:
            await self.start()
        assert self._consumer is not None
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        n = 0
        for tp, msgs in batch.items():
            for m in msgs:
                self.handle(tp.topic, tp.partition, m.offset, m.value)
                n += 1
        if n and self.group_id is not None:
            await self._consumer.commit()
        return n

    async def run_until_idle(self, idle_ms: int = 1000, max_wait_s: float = 60.0) -> ConsumerStats:
        """Consume until no record arrived for `idle_ms` (after partitions are assigned)."""
        if self._consumer is None:
            await self.start()
        deadline = time.monotonic() + max_wait_s
        while not self.assigned:  # group mode: the join takes a few seconds
            if time.monotonic() >= deadline:
                raise TimeoutError(f"indexer got no partitions of {self.topic!r} within {max_wait_s}s")
            await self.poll(timeout_ms=200)
        while await self.poll(timeout_ms=idle_ms):
            if time.monotonic() >= deadline:
                log.warning("indexer: still receiving records after %.0fs; returning", max_wait_s)
                break
        return self.stats

    async def run_forever(self, stop: asyncio.Event | None = None, poll_ms: int = 1000) -> ConsumerStats:
        """Consume until `stop` is set (or the task is cancelled)."""
        if self._consumer is None:
            await self.start()
        while stop is None or not stop.is_set():
            await self.poll(timeout_ms=poll_ms)
        return self.stats


# ---------------------------------------------------------------------------------------------
async def build_index(bootstrap: str, embeddings_topic: str, *, idle_ms: int = 1000,
                      max_wait_s: float = 60.0, security: KafkaSecurity | None = None
                      ) -> tuple[VectorIndex, ConsumerStats]:
    """A fresh index of everything currently in the embeddings topic."""
    async with IndexerConsumer(bootstrap, embeddings_topic, security=security) as consumer:
        stats = await consumer.run_until_idle(idle_ms=idle_ms, max_wait_s=max_wait_s)
        return consumer.index, stats


async def search_end_to_end(bootstrap: str, embeddings_topic: str, worker_url: str, conversation_id: str, text: str,
                            k: int = 5, texts: TextMap | None = None, *, idle_ms: int = 1000,
                            timeout: float = 30.0, security: KafkaSecurity | None = None,
                            api_key: str | None = None, tenant: str | None = None) -> list[SearchHit]:
    """Index the embeddings topic (from the beginning), embed `text` against the conversation's
    live memory on the worker, and return the conversation's `k` best turns. A conversation
    without memory (unknown, deleted) has no turns in the index either: [] rather than an error."""
    from stream.clients.query_client import query_worker_async, together

    # Both at once; whichever fails first cancels the other.
    (index, stats), resp = await together(
        build_index(bootstrap, embeddings_topic, idle_ms=idle_ms, max_wait_s=timeout, security=security),
        query_worker_async(worker_url, conversation_id, text, k=k, timeout=timeout, api_key=api_key, tenant=tenant,
                           unknown_conversation="memoryless"))
    if stats.skipped:
        log.warning("search: %d records of %s could not be parsed and were skipped: %s", stats.skipped,
                    embeddings_topic, dict(stats.skipped_reasons))
    return index.search(conversation_id, decode_vector(resp.vector), k, checkpoint=resp.checkpoint, texts=texts)


def turn_texts(conversations: list[dict]) -> dict[tuple[str, int], str]:
    """{(conversation_id, seq): "user: ...\\nassistant: ..."} for conversations in the producer's
    JSONL shape ({"conversation_id", "turns": [{"user", "assistant"}, ...]})."""
    out: dict[tuple[str, int], str] = {}
    for conv in conversations:
        for seq, t in enumerate(conv["turns"]):
            parts = [f"{role}: {t[role]}" for role in ("user", "assistant") if t.get(role) is not None]
            out[(conv["conversation_id"], seq)] = "\n".join(parts)
    return out


__all__ = ["ConsumerStats", "IndexEntry", "IndexStats", "IndexerConsumer", "TopicNotFound", "VectorIndex",
           "build_index", "parse_outbound", "search_end_to_end", "turn_texts"]
