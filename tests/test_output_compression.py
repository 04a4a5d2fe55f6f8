"""EVOSTREAM_OUTPUT_COMPRESSION reaches the wire, and a codec that cannot work is refused at
start-up (issue #13). Real broker; the codec of a stored batch is observed by reading it back
with that codec's library made unavailable (it must then be unreadable, and only then)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from stream.kafka import unreadable
from stream.kafka.emitter import KafkaEmitter, OutMessage, require_codec
from stream.settings import Settings
from stream.kafka.topics import run_sync
from devtools.faults import disable_codecs_for_tests
from stream.kafka.unreadable import UnreadableBatches


async def _emit(bootstrap: str, topic: str, compression: str) -> None:
    emitter = KafkaEmitter(bootstrap, compression=compression)
    try:
        await emitter.send_all([OutMessage(topic, b"c1", b'{"type":"embedding","n":%d}' % i) for i in range(5)])
    finally:
        await emitter.stop()


async def _read(bootstrap: str, topic: str) -> list[bytes]:
    cons = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await cons.start()
    try:
        tp = TopicPartition(topic, 0)
        cons.assign([tp])
        await cons.seek_to_beginning(tp)
        out: list[bytes] = []
        for _ in range(3):
            batch = await cons.getmany(timeout_ms=700)
            out += [m.value for msgs in batch.values() for m in msgs]
        return out
    finally:
        await cons.stop()


@pytest.mark.parametrize("codec, needs", [("zstd", "zstd"), ("lz4", "lz4"), ("gzip", "gzip")])
def test_configured_codec_is_what_lands_on_the_topic(kafka_bootstrap: str, topic_factory,
                                                     monkeypatch: pytest.MonkeyPatch, codec: str, needs: str) -> None:
    topic = topic_factory(1)
    run_sync(lambda: _emit(kafka_bootstrap, topic, codec))
    assert len(run_sync(lambda: _read(kafka_bootstrap, topic))) == 5  # readable with every library
    from aiokafka import codec as codecs

    other = "snappy"
    for name in (needs, other):
        monkeypatch.setattr(codecs, f"has_{name}", getattr(codecs, f"has_{name}"))
    batches = UnreadableBatches(CollectorRegistry())
    unreadable.install(batches.report)
    try:
        disable_codecs_for_tests({"EVOSTREAM_FAULT_DISABLE_CODECS": other})
        assert len(run_sync(lambda: _read(kafka_bootstrap, topic))) == 5 and not batches.stopped()
        disable_codecs_for_tests({"EVOSTREAM_FAULT_DISABLE_CODECS": needs})
        assert run_sync(lambda: _read(kafka_bootstrap, topic)) == []
        (stopped,) = batches.stopped()
        assert stopped.offset == 0 and needs in stopped.error
    finally:
        unreadable.uninstall()


def test_unusable_codec_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import codec as codecs

    require_codec(None), require_codec("none"), require_codec("zstd")
    with pytest.raises(ValueError, match="unknown compression codec"):
        require_codec("brotli")
    monkeypatch.setattr(codecs, "has_zstd", lambda: False)
    with pytest.raises(ValueError, match="no library"):
        KafkaEmitter("127.0.0.1:1", compression="zstd")
    KafkaEmitter("127.0.0.1:1", compression="gzip")


def test_setting_default_and_values() -> None:
    assert Settings().output_compression == "zstd"
    with pytest.raises(ValueError, match="output_compression\n  Input should be 'none', 'gzip', 'snappy', 'lz4' or 'zstd'"):
        Settings(output_compression="brotli")
