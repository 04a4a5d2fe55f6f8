"""Produce to Kafka and wait until the broker has every record, retrying, never dropping.

The pipeline only acknowledges its input after this returns, so a record we fail to produce is
a record we will consume (and emit) again, not one we lose. Retries back off and repeat until
the broker takes the batch or the worker is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer, codec
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from stream.kafka.security import KafkaSecurity
from stream.backoff import Backoff

if TYPE_CHECKING:
    from stream.kafka.connect import ConnectConventions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutMessage:
    topic: str
    key: bytes | None
    value: bytes | None  # None: a Kafka tombstone (stream/kafka/connect.py)
    headers: tuple[tuple[str, bytes], ...] = ()


def require_codec(compression: str | None) -> None:
    """Raise ValueError unless aiokafka can compress with `compression` (None/"none": always).

    Why here: with the codec's library missing, aiokafka only fails when it builds the first
    batch, inside its sender task -- the worker would look healthy and emit nothing."""
    if compression in (None, "none"):
        return
    check = getattr(codec, f"has_{compression}", None)
    if check is None:
        raise ValueError(f"unknown compression codec {compression!r}; use none, gzip, snappy, lz4 or zstd")
    if not check():
        raise ValueError(f"output compression {compression!r} is configured but aiokafka has no library for it "
                         "(install cramjam, in requirements.lock) -- or set EVOSTREAM_OUTPUT_COMPRESSION")


class KafkaEmitter:
    def __init__(self, bootstrap: str, *, idempotent: bool = False, linger_ms: int = 5,
                 max_request_size: int = 4 * 1024 * 1024, backoff: Backoff = Backoff(),
                 security: KafkaSecurity | None = None, compression: str | None = None,
                 on_retry: Callable[[], None] | None = None,
                 on_too_large: Callable[[OutMessage, BaseException], OutMessage | None] | None = None,
                 connect: "ConnectConventions | None" = None):
        require_codec(compression)  # fail at start-up, not in the producer's sender (issue #13)
        self._producer_kwargs: dict = dict(
            bootstrap_servers=bootstrap,
            enable_idempotence=idempotent,
            acks="all",
            linger_ms=linger_ms,
            max_request_size=max_request_size,
            # Batch compression of what we produce (issue #13): None/"none" or a Kafka codec.
            compression_type=None if compression in (None, "none") else compression,
        )
        if security is not None:  # TLS/SASL (issue #8): the same settings as every other client
            self._producer_kwargs.update(security.client_kwargs())
        self._producer: AIOKafkaProducer | None = None
        self._backoff = backoff
        self._on_retry = on_retry  # e.g. a metrics counter's inc (issue #12)
        # A record refused as too large is never retried as is (that would stall the partition
        # for ever): the hook returns what to send instead (a smaller dead letter), or None to
        # drop it (issue #8, stream/processing/dead_letters.py). Without a hook it is dropped, logged.
        self._on_too_large = on_too_large
        # issue #19: document-id header, plain float vectors, null-value tombstones (a pure
        # function of each record, so re-emitted copies stay identical)
        self._connect = connect
        self.retries = 0
        self.sent = 0

    async def start(self) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(**self._producer_kwargs)
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def send_all(self, messages: list[OutMessage]) -> None:
        """Return once the broker acknowledged every message (at least once), keeping per-key
        order on retries; retries with capped back-off for as long as it takes (the caller
        acknowledges its input only afterwards, and shutdown cancels this).

        Per-key order: the broker may take some messages of a call and fail others (another
        partition's leader, a request that timed out). Resending only the failed ones could put
        a conversation's embedding after its `conversation_deleted` event. So a failed message
        is resent together with every later message of the same (topic, key) in this call,
        even those the broker already has: each key's *last* copies are then in call order,
        and the extra copies are identical duplicates that consumers drop by
        (conversation_id, seq). Messages without a key have no order to keep."""
        pending = self._connect.apply(list(messages)) if self._connect is not None else list(messages)
        attempt = 0
        t0 = time.monotonic()
        while pending:
            failed: set[int] = set()
            error: BaseException | None = None
            try:
                await self.start()
            except KafkaError as exc:
                failed, error = set(range(len(pending))), exc
            if not failed:
                assert self._producer is not None
                futures: list[object] = []
                for m in pending:
                    try:
                        futures.append(await self._producer.send(
                            m.topic, m.value, key=m.key, **({"headers": list(m.headers)} if m.headers else {})))
                    except KafkaError as exc:
                        futures.append(exc)
                for i, fut in enumerate(futures):
                    if isinstance(fut, BaseException):
                        failed.add(i)
                        error = fut
                        continue
                    try:
                        await fut  # type: ignore[misc]
                    except KafkaError as exc:
                        failed.add(i)
                        error = exc
                        futures[i] = exc
                pending, failed = self._replace_too_large(pending, futures, failed)
            resend = self._with_later_same_key(pending, failed)
            self.sent += len(pending) - len(resend)
            if not resend:
                if attempt:
                    log.info("produce delivered after %d retries (%.1f s)", attempt, time.monotonic() - t0)
                return
            pending = resend
            attempt += 1
            self.retries += 1
            if self._on_retry is not None:
                self._on_retry()
            delay = self._backoff.delay(attempt)
            # one line on the first retry, then on retries 2, 4, 8, ...: a broker outage of an
            # hour costs a dozen lines, not one per attempt
            if attempt & (attempt - 1) == 0:
                log.warning("produce failed (%s: %s); retrying %d record(s) with back-off (attempt %d, %.1f s so far)",
                            type(error).__name__, error, len(pending), attempt, time.monotonic() - t0)
            await asyncio.sleep(delay)

    def _replace_too_large(self, pending: list[OutMessage], outcomes: list[object],
                           failed: set[int]) -> tuple[list[OutMessage], set[int]]:
        """(pending, failed) with each record refused as too large replaced by the hook's answer
        (kept in its place, so per-key order holds) or, where the hook gives None, removed."""
        if not any(isinstance(outcomes[i], MessageSizeTooLargeError) for i in failed):
            return pending, failed
        out: list[OutMessage] = []
        still: set[int] = set()
        for i, m in enumerate(pending):
            exc = outcomes[i]
            if i in failed and isinstance(exc, MessageSizeTooLargeError):
                m2 = self._on_too_large(m, exc) if self._on_too_large is not None else None
                if m2 is None:
                    log.error("dropped a record for %s refused as too large: %s", m.topic, exc)
                    continue
                m = m2
            if i in failed:
                still.add(len(out))
            out.append(m)
        return out, still

    @staticmethod
    def _with_later_same_key(pending: list[OutMessage], failed: set[int]) -> list[OutMessage]:
        """The failed messages plus every later message of the same (topic, key), in order."""
        if not failed:
            return []
        first: dict[tuple[str, bytes], int] = {}
        for i in sorted(failed):
            m = pending[i]
            if m.key is not None:
                first.setdefault((m.topic, m.key), i)
        out = []
        for i, m in enumerate(pending):
            if i in failed:
                out.append(m)
            elif m.key is not None and (m.topic, m.key) in first and i > first[(m.topic, m.key)]:
                out.append(m)
        return out
