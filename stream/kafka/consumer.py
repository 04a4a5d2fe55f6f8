"""Tuning of the consumer faust creates, where faust offers no setting."""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka


def set_fetch_max_wait(ms: int) -> None:
    """faust creates its consumer with fetch_max_wait_ms=1500 and offers no setting. Brokers
    that hold a fetch until that wait expires (tansu does, measured: p50 ~500 ms per hop) then
    add it to every turn's latency. We wrap faust's factory and set aiokafka's (private but
    long-stable) attribute before the consumer starts its fetcher."""
    cls = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(cls, "_evostream_original_create", None) or cls._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    cls._evostream_original_create = original
    cls._create_worker_consumer = create
