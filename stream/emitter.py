"""Produce to Kafka and wait until the broker has every record, retrying, never dropping.

The pipeline only acknowledges its input after this returns, so a record we fail to produce is
a record we will consume (and emit) again, not one we lose. Retries back off and repeat until
the broker takes the batch or the worker is stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stream.recovery import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutMessage:
    topic: str
    key: bytes | None
    value: bytes


class KafkaEmitter:
    def __init__(self, bootstrap: str, *, idempotent: bool = False, linger_ms: int = 5,
                 max_request_size: int = 4 * 1024 * 1024, backoff: Backoff = Backoff()):
        self._producer_kwargs = dict(
            bootstrap_servers=bootstrap,
            enable_idempotence=idempotent,
            acks="all",
            linger_ms=linger_ms,
            max_request_size=max_request_size,
            compression_type=None,
        )
        self._producer: AIOKafkaProducer | None = None
        self._backoff = backoff
        self.retries = 0
        self.sent = 0

    async def start(self) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(**self._producer_kwargs)
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def send_all(self, messages: list[OutMessage]) -> None:
        """Return once the broker acknowledged every message (at least once)."""
        pending = list(messages)
        attempt = 0
        while pending:
            await self.start()
            assert self._producer is not None
            futures = []
            for m in pending:
                try:
                    futures.append((m, await self._producer.send(m.topic, m.value, key=m.key)))
                except KafkaError as exc:
                    futures.append((m, exc))
            failed: list[OutMessage] = []
            for m, fut in futures:
                if isinstance(fut, BaseException):
                    failed.append(m)
                    continue
                try:
                    await fut
                except KafkaError as exc:
                    log.warning("produce to %s failed (%s); will retry", m.topic, exc)
                    failed.append(m)
            self.sent += len(pending) - len(failed)
            pending = failed
            if pending:
                attempt += 1
                self.retries += 1
                delay = self._backoff.delay(attempt)
                log.warning("retrying %d unsent records in %.2fs (attempt %d)", len(pending), delay, attempt)
                await asyncio.sleep(delay)
