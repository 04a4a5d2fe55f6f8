"""Dead letters always fit the broker's record limit; a record refused as too large never
stalls the emitter (issue #8).

The bug: a dead letter carries its original record in base64, so for a record at the default
1,000,000-byte input limit it reached ~1.35 MB, above Kafka's default message.max.bytes
(1,048,588); the broker refused it and the emitter retried for ever.

Limits: tansu (the local broker) accepts records of any size (measured: 2,000,000 bytes into a
topic with max.message.bytes=2000), so a refusal BY THE BROKER cannot be produced here. The
tests use the size check aiokafka's producer applies before sending (`max_request_size`, the
same record-batch size the broker compares with message.max.bytes; the worker sets it to
EVOSTREAM_KAFKA_MAX_MESSAGE_BYTES), which raises the same MessageSizeTooLargeError a broker
refusal does, plus one isolated test of the broker-refusal branch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from schemas.events import DeadLetterEvent, DeadLetterReason, EmbeddingEvent
from stream.processing.dead_letters import OversizeHandler, fit_dead_letter, record_size
from stream.processing.dead_letters import Rejection, make_dead_letter
from stream.kafka.emitter import KafkaEmitter, OutMessage
from stream.kafka.topics import run_sync

from support.traffic import Workers, pipeline_env, produce, turn_record
from support.workers import WorkerProc, read_topic_sync, wait_for

KAFKA_DEFAULT_LIMIT = 1_048_588


def _too_large_letter(key: bytes | None, value: bytes, **kw: object) -> DeadLetterEvent:
    rej = Rejection(reason_code=DeadLetterReason.TOO_LARGE, reason=f"value is {len(value)} bytes; limit is 1000000")
    return make_dead_letter(rej, key, value, "evostream.turns", 3, 12345, 1_700_000_000_000, "w-1", **kw)


def test_dead_letter_of_a_record_at_the_input_limit_fits_kafkas_default_limit(kafka_bootstrap: str,
                                                                              topic_factory) -> None:
    rnd = random.Random(8)
    key = b"conversation-" + b"k" * 87
    value = rnd.randbytes(1_000_000 - len(key))  # the input limit counts key + value
    whole = _too_large_letter(key, value)
    # the bug, kept visible: the whole dead letter is above Kafka's default limit
    assert record_size(key, whole.model_dump_json().encode()) > KAFKA_DEFAULT_LIMIT

    dl = _too_large_letter(key, value, broker_limit=KAFKA_DEFAULT_LIMIT)
    raw = dl.model_dump_json().encode()
    assert record_size(key, raw) <= KAFKA_DEFAULT_LIMIT
    assert dl.truncated and dl.original_value_len == len(value) and dl.original_key_len == len(key)
    assert dl.original_value_sha256 == hashlib.sha256(value).hexdigest()
    assert dl.original_key() == key  # the small key is kept whole, the value is cut
    prefix = dl.original_value()
    assert prefix and value.startswith(prefix) and len(prefix) > 700_000  # as much as fits
    assert dl.reason_code is DeadLetterReason.TOO_LARGE and dl.offset == 12345

    # a producer enforcing Kafka's default limit takes it; it reads back intact from the broker
    topic = topic_factory(1)

    async def send() -> None:
        p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=KAFKA_DEFAULT_LIMIT, acks="all")
        await p.start()
        try:
            await p.send_and_wait(topic, raw, key=key)
        finally:
            await p.stop()

    run_sync(send)
    (msg,) = read_topic_sync(kafka_bootstrap, topic)
    back = DeadLetterEvent.model_validate_json(msg.value)
    assert back == dl


def test_small_dead_letters_stay_whole() -> None:
    dl = _too_large_letter(b"c1", b'{"broken json', broker_limit=KAFKA_DEFAULT_LIMIT)
    assert not dl.truncated and dl.original_value() == b'{"broken json' and dl.original_value_sha256 is None


def test_fit_cuts_the_key_too_when_the_key_alone_is_too_large() -> None:
    key, value = b"K" * 30_000, b"V" * 30_000
    # (the dead-letter record itself unkeyed: a 30 KB record key could not fit 20 KB anyway)
    dl = fit_dead_letter(_too_large_letter(key, value), None, 20_000)
    assert record_size(None, dl.model_dump_json().encode()) <= 20_000
    assert dl.original_value() == b"" and dl.original_value_len == 30_000
    assert dl.original_key_len == 30_000 and dl.original_key_sha256 == hashlib.sha256(key).hexdigest()
    assert 0 < len(dl.original_key()) < 30_000 and key.startswith(dl.original_key())


def _embedding_bytes(cid: str, seq: int, dim: int) -> bytes:
    from datetime import datetime, timezone

    from schemas.vectors import encode_vector
    import numpy as np

    ev = {"conversation_id": cid, "seq": seq, "vector": encode_vector(np.ones(dim, dtype=np.float32)),
          "dim": dim, "checkpoint": "ck", "model": "m", "memory_len": 1,
          "source": {"topic": "evostream.turns", "partition": 0, "offset": 77},
          "timings": {"queue_ms": 0, "step_ms": 0, "checkpoint_ms": 0},
          "produced_at": datetime.now(timezone.utc)}
    return EmbeddingEvent.model_validate(ev).model_dump_json().encode()


def test_emitter_replaces_refused_records_and_keeps_going(kafka_bootstrap: str, topic_factory) -> None:
    """A dead letter above the limit is cut and delivered; an embedding above the limit
    becomes a dead letter; small records around them go through; send_all returns."""
    dlq, emb = topic_factory(1), topic_factory(1)
    limit = 20_000
    handler = OversizeHandler(dead_letter_topic=dlq, embeddings_topic=emb, limit=limit, worker="w")
    big_dl = _too_large_letter(b"c1", os.urandom(60_000)).model_dump_json().encode()
    small = _embedding_bytes("c1", 0, 8)
    huge_emb = _embedding_bytes("c2", 5, 8192)  # ~44 KB of base64
    msgs = [OutMessage(emb, b"c1", small), OutMessage(dlq, b"c1", big_dl), OutMessage(emb, b"c2", huge_emb),
            OutMessage(emb, b"c1", _embedding_bytes("c1", 1, 8))]

    async def go() -> KafkaEmitter:
        e = KafkaEmitter(kafka_bootstrap, max_request_size=limit, on_too_large=handler)
        try:
            await asyncio.wait_for(e.send_all(msgs), 60)
        finally:
            await e.stop()
        return e

    run_sync(go)
    assert handler.replaced == 2 and handler.dropped == 0
    emitted = [json.loads(m.value) for m in read_topic_sync(kafka_bootstrap, emb)]
    assert [(e["conversation_id"], e["seq"]) for e in emitted] == [("c1", 0), ("c1", 1)]
    letters = [DeadLetterEvent.model_validate_json(m.value) for m in read_topic_sync(kafka_bootstrap, dlq)]
    assert len(letters) == 2
    cut, from_embedding = letters
    assert cut.truncated and cut.original_value_len == 60_000
    assert from_embedding.reason_code is DeadLetterReason.PROCESSING_ERROR
    assert "refused by the broker as too large" in from_embedding.reason
    assert (from_embedding.topic, from_embedding.partition, from_embedding.offset) == ("evostream.turns", 0, 77)
    assert from_embedding.original_value_sha256 == hashlib.sha256(huge_emb).hexdigest()
    for m in read_topic_sync(kafka_bootstrap, dlq):
        assert record_size(m.key, m.value) <= limit


def test_broker_refusal_is_replaced_not_retried_for_ever() -> None:
    """Isolated: the broker's MESSAGE_TOO_LARGE arrives on the delivery future (tansu never
    sends it), and a record that cannot be shrunk is dropped with an error, not retried."""

    class RefusingProducer:
        def __init__(self) -> None:
            self.sent: list[OutMessage] = []

        async def send(self, topic: str, value: bytes, key: bytes | None = None):
            fut = asyncio.get_running_loop().create_future()
            if len(value) > 5000:
                fut.set_exception(MessageSizeTooLargeError("broker: MESSAGE_TOO_LARGE"))
            else:
                self.sent.append(OutMessage(topic, key, value))
                fut.set_result(None)
            return fut

    handler = OversizeHandler(dead_letter_topic="dlq", embeddings_topic="emb", limit=16_384, worker="w")

    async def go() -> RefusingProducer:
        e = KafkaEmitter("127.0.0.1:1", on_too_large=handler)
        prod = RefusingProducer()
        e._producer = prod  # type: ignore[assignment]
        await asyncio.wait_for(e.send_all([
            OutMessage("dlq", b"k", _too_large_letter(b"k", os.urandom(12_000)).model_dump_json().encode()),
            OutMessage("other", b"k", b"x" * 9000),  # cannot be made smaller: dropped
            OutMessage("emb", b"k", b"small"),
        ]), 30)
        return prod

    prod = asyncio.run(go())
    assert sorted(m.topic for m in prod.sent) == ["dlq", "emb"] and handler.dropped == 1
    (dl,) = [m for m in prod.sent if m.topic == "dlq"]
    assert DeadLetterEvent.model_validate_json(dl.value).truncated and len(dl.value) <= 5000


def test_worker_dead_letters_fit_a_small_broker_limit_and_the_stream_flows(kafka_bootstrap: str, redis_url: str,
                                                                        tmp_path: Path) -> None:
    """End to end: with EVOSTREAM_KAFKA_MAX_MESSAGE_BYTES=16384 a 300 KB turn is dead-lettered
    cut to the limit, and the turns after it (same and other conversations) are embedded."""
    from support.traffic import TopicMaker

    topics = TopicMaker(kafka_bootstrap, "dl-size")
    procs = Workers()
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=1,
                            extra={"EVOSTREAM_KAFKA_MAX_MESSAGE_BYTES": "16384"})
        w = procs.add(WorkerProc(penv, tmp_path, "dlsize").start())
        w.wait_ready(180)
        huge = "word " * 60_000  # 300 KB of text: far above max_turn_tokens -> turn_too_long
        records = [turn_record("a", 0, "hello"), turn_record("b", 0, huge), turn_record("a", 1, "again"),
                   turn_record("c", 0, "other")]
        produce(kafka_bootstrap, penv.turns_topic, records)
        letters = wait_for(lambda: read_topic_sync(kafka_bootstrap, penv.dead_letter_topic, idle_ms=500), 180,
                           what="a dead letter")
        wait_for(lambda: len(read_topic_sync(kafka_bootstrap, penv.embeddings_topic, idle_ms=500)) >= 3, 180,
                 what="3 embeddings after the oversized turn")
        (m,) = letters
        assert record_size(m.key, m.value) <= 16384
        dl = DeadLetterEvent.model_validate_json(m.value)
        assert dl.truncated and dl.original_value_len == len(records[1][1])
        assert dl.original_value_sha256 == hashlib.sha256(records[1][1]).hexdigest()
        assert records[1][1].startswith(dl.original_value())
        assert w.alive()
    finally:
        for p in procs.procs:
            p.stop()
        topics.close()
