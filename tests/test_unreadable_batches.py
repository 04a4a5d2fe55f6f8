"""The unreadable-batch guard (stream/kafka/unreadable.py) on a real aiokafka consumer and the real
local broker, in process (issue #13). The worker-level behaviour (one partition stopped, the
others flowing, /readyz and metrics, a healthy worker resuming) is in
tests/test_interop_codecs.py.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import UnsupportedCodecError
from prometheus_client import CollectorRegistry

from stream.kafka import unreadable
from stream.kafka.topics import run_sync
from devtools.faults import disable_codecs_for_tests
from stream.kafka.unreadable import UnreadableBatches


async def _produce(bootstrap: str, topic: str, partition: int, values: list[bytes], codec: str | None) -> list[int]:
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, compression_type=codec)
    await prod.start()
    try:
        futs = [await prod.send(topic, v, key=b"k", partition=partition) for v in values]
        return [(await f).offset for f in futs]
    finally:
        await prod.stop()


async def _drain(bootstrap: str, topic: str) -> tuple[dict[int, list[int]], set[int], BaseException | None]:
    """Offsets read per partition, the partitions the consumer paused, the error if any."""
    cons = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await cons.start()
    got: dict[int, list[int]] = {0: [], 1: []}
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        cons.assign(tps)
        await cons.seek_to_beginning(*tps)
        idle = 0
        while idle < 3:
            try:
                batch = await cons.getmany(timeout_ms=700)
            except UnsupportedCodecError as exc:
                return got, {tp.partition for tp in cons.paused()}, exc
            idle = 0 if batch else idle + 1
            for tp, msgs in batch.items():
                got[tp.partition] += [m.offset for m in msgs]
        return got, {tp.partition for tp in cons.paused()}, None
    finally:
        await cons.stop()


@pytest.fixture
def zstd_topic(kafka_bootstrap: str, topic_factory) -> tuple[str, int]:
    """p0: 3 plain records, then one zstd batch of 3, then 2 plain; p1: 2 gzip, 2 lz4."""
    topic = topic_factory(2)

    async def fill() -> int:
        await _produce(kafka_bootstrap, topic, 0, [b"a", b"b", b"c"], None)
        (first, *_) = await _produce(kafka_bootstrap, topic, 0, [b"z1", b"z2", b"z3"], "zstd")
        await _produce(kafka_bootstrap, topic, 0, [b"d", b"e"], None)
        await _produce(kafka_bootstrap, topic, 1, [b"g1", b"g2"], "gzip")
        await _produce(kafka_bootstrap, topic, 1, [b"l1", b"l2"], "lz4")
        return first

    return topic, run_sync(fill)


@pytest.fixture
def zstd_missing(monkeypatch: pytest.MonkeyPatch):
    from aiokafka import codec

    monkeypatch.setattr(codec, "has_zstd", codec.has_zstd)  # restored after the test
    assert disable_codecs_for_tests({"EVOSTREAM_FAULT_DISABLE_CODECS": "zstd"}) == {"zstd"}
    yield
    unreadable.uninstall()


def test_without_the_guard_the_consumer_loop_raises(kafka_bootstrap: str, zstd_topic, zstd_missing) -> None:
    """The failure mode of the code before issue #13: the error escapes getmany()."""
    unreadable.uninstall()
    topic, _ = zstd_topic
    _, _, error = run_sync(lambda: _drain(kafka_bootstrap, topic))
    assert isinstance(error, UnsupportedCodecError) and "zstd" in str(error)


def test_guard_stops_before_the_batch_and_keeps_other_partitions(kafka_bootstrap: str, zstd_topic,
                                                                  zstd_missing) -> None:
    topic, zstd_offset = zstd_topic
    batches = UnreadableBatches(CollectorRegistry())
    unreadable.install(batches.report)
    got, paused, error = run_sync(lambda: _drain(kafka_bootstrap, topic))
    assert error is None
    assert got[0] == [0, 1, 2] and zstd_offset == 3  # everything before the batch, nothing after
    assert got[1] == [0, 1, 2, 3]  # the other partition (gzip, lz4) flows
    assert paused == {0}
    (stopped,) = batches.stopped()
    assert (stopped.topic, stopped.partition, stopped.offset) == (topic, 0, zstd_offset)
    assert "zstd" in stopped.error
    assert batches.total.labels(partition="0")._value.get() == 1
    assert batches.gauge.labels(partition="0")._value.get() == 1


def test_with_the_codec_back_everything_is_read(kafka_bootstrap: str, zstd_topic) -> None:
    topic, _ = zstd_topic
    batches = UnreadableBatches(CollectorRegistry())
    unreadable.install(batches.report)
    try:
        got, paused, error = run_sync(lambda: _drain(kafka_bootstrap, topic))
    finally:
        unreadable.uninstall()
    assert error is None and paused == set() and batches.stopped() == []
    assert got == {0: list(range(8)), 1: [0, 1, 2, 3]}


def test_reports_are_deduplicated_and_forgotten_on_revoke() -> None:
    batches = UnreadableBatches(CollectorRegistry())
    err = UnsupportedCodecError("Libraries for zstd compression codec not found")
    for _ in range(3):  # refetched before the pause took effect
        batches.report("t", 2, 40, err)
    assert [(s.partition, s.offset) for s in batches.stopped()] == [(2, 40)]
    assert batches.total.labels(partition="2")._value.get() == 1
    batches.forget("t", {2})
    assert batches.stopped() == [] and batches.gauge.labels(partition="2")._value.get() == 0


def test_fault_hook_rejects_unknown_codecs() -> None:
    with pytest.raises(ValueError, match=r"EVOSTREAM_FAULT_DISABLE_CODECS: unknown codec\(s\) \['brotli'\]"):
        disable_codecs_for_tests({"EVOSTREAM_FAULT_DISABLE_CODECS": "brotli"})
    assert disable_codecs_for_tests({}) == frozenset()
