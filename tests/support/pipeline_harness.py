"""One pipeline (one "worker") in-process, over a REAL Redis and the real tiny engine.

The only stand-in is the emitter, which records what the pipeline would produce: these tests
are about admission and the memory-state store; the end-to-end tests and the chaos suite run
the same rules through the real broker. Records get increasing offsets on one partition
unless a test places them (`offset=`), like replays do.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from schemas.events import ConversationDeleted, DeadLetterEvent, EmbeddingEvent
from schemas.turns import ChatMessage, TurnInput
from stream.kafka.emitter import OutMessage
from stream.processing.pipeline import TurnPipeline
from stream.processing.records import InboundRecord
from stream.runtime.metrics import Metrics
from stream.settings import Settings
from stream.state.cache import StateCache
from stream.state.store import MemoryStore
from tests.support.oracle import offline_engine

TURNS, EMB, DLT = "turns", "embeddings", "dead-letters"
_offsets = itertools.count(1)


class RecordingEmitter:
    """Stands in for the broker: keeps what the pipeline emits, in order."""

    def __init__(self) -> None:
        self.sent: list[OutMessage] = []

    async def send_all(self, messages: list[OutMessage]) -> None:
        self.sent.extend(messages)

    def embeddings(self) -> list[EmbeddingEvent]:
        return [EmbeddingEvent.model_validate_json(m.value) for m in self.sent
                if m.topic == EMB and b'"type":"embedding"' in m.value]

    def tombstones(self) -> list[ConversationDeleted]:
        return [ConversationDeleted.model_validate_json(m.value) for m in self.sent
                if m.topic == EMB and b'"conversation_deleted"' in m.value]

    def dead_letters(self) -> list[DeadLetterEvent]:
        return [DeadLetterEvent.model_validate_json(m.value) for m in self.sent if m.topic == DLT]

    def clear(self) -> None:
        self.sent.clear()


def _texts(cid: str, seq: int, text: str | None) -> tuple[str, str]:
    return (text if text is not None else f"{cid} asks question number {seq} about the river and the stone",
            f"answer {seq}: the window faces the garden")


def turn_value(cid: str, seq: int, text: str | None = None, tenant: str | None = None) -> bytes:
    user, answer = _texts(cid, seq, text)
    ev: dict[str, Any] = {"type": "turn", "conversation_id": cid, "seq": seq, "timestamp": "2026-11-30T12:00:00Z",
                          "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if tenant is not None:
        ev["tenant"] = tenant
    return json.dumps(ev).encode()


def turn_input(cid: str, seq: int, text: str | None = None) -> TurnInput:
    """What the model reads of `turn_value(cid, seq, text)` (for the offline replay)."""
    user, answer = _texts(cid, seq, text)
    return TurnInput(conversation_id=cid, seq=seq, messages=[ChatMessage(role="user", content=user),
                                                             ChatMessage(role="assistant", content=answer)])


class Harness:
    """A TurnPipeline as a worker builds it (store, cache, metrics), fed by hand."""

    def __init__(self, redis_url: str, namespace: str, *, engine: Any = None, **settings: Any) -> None:
        self.engine = engine or offline_engine()
        self.settings = Settings(redis_url=redis_url, redis_namespace=namespace, turns_topic=TURNS,
                                 embeddings_topic=EMB, dead_letter_topic=DLT,
                                 worker_id=f"h-{uuid.uuid4().hex[:6]}", **settings)
        s = self.settings
        self.store = MemoryStore(redis_url, fingerprint=self.engine.fingerprint, hidden_size=self.engine.hidden_size,
                                 capacity=self.engine.capacity, dtype=self.engine.state_dtype, namespace=namespace,
                                 ttl_s=s.state_ttl_s, marker_ttl_s=s.marker_ttl_s, compact_every=s.compact_every,
                                 writer_id=s.worker_id)
        self.emitter = RecordingEmitter()
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.metrics = Metrics()
        self.pipeline = TurnPipeline(self.engine, self.store, self.emitter, s, self.executor, self.metrics,
                                     cache=StateCache(s.cache_max_bytes))

    async def feed(self, *values: tuple[str, bytes], partition: int = 0, offset: int | None = None) -> list[int]:
        """Process the records as one batch; returns their offsets."""
        recs = [InboundRecord(TURNS, partition, offset if offset is not None else next(_offsets), key.encode(), value,
                              int(datetime.now(UTC).timestamp() * 1000)) for key, value in values]
        await self.pipeline.process(recs)
        return [r.offset for r in recs]

    async def turns(self, cid: str, seqs: Any, **kw: Any) -> list[int]:
        return await self.feed(*[(cid, turn_value(cid, s)) for s in seqs], **kw)

    async def close(self) -> None:
        await self.store.close()
        self.executor.shutdown(wait=False)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)
