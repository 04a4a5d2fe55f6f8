"""`evostream sink`: the embeddings topic (and the turns topic, for texts) into an index, exactly
once (issue #19).

How exactly-once holds without Kafka transactions: the sink is not in a consumer group and
commits nothing to Kafka. The offsets it has consumed live in the index, written in the SAME
database transaction as the rows of the batch that reached them (the pattern of the JDBC sink
connectors). On start, and after any failed transaction, it seeks every partition to the
offsets stored there (the beginning where there are none). A crash anywhere therefore loses
nothing (the rows are not committed, neither are the offsets: they are read again) and
doubles nothing (committed rows come with their offsets: they are not read again); rows keyed
by (tenant, conversation, generation, seq) make even a replay from offset 0 harmless.

Batching and back-pressure: one fetch of at most `sink_batch_max` records is one transaction.
The sink pulls; when the database is slower than the topic fills, records wait in Kafka (the
lag gauge grows), the sink's memory does not. While the database is unreachable the sink
retries with back-off, re-seeking to the stored offsets each time.

One active sink per `sink_name` (a writer lock in the index: a PostgreSQL advisory lock, a
lock file for SQLite); a second one waits as a standby.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from stream.backoff import Backoff
from stream.index.base import Record, VectorIndex
from stream.index.ops import BatchStats, parse_embedding_record, parse_turn_record
from stream.kafka.security import KafkaSecurity

log = logging.getLogger(__name__)


class TopicNotFound(RuntimeError):
    pass


class SinkMetrics:
    """Prometheus metrics of one sink process (served by `evostream sink` on sink_metrics_port)."""

    def __init__(self, registry: Any = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records = Counter("evostream_sink_records", "records consumed and committed", ["topic"], registry=r)
        self.rows = Counter("evostream_sink_rows_upserted", "turn rows written (inserted or replaced)", registry=r)
        self.deletes = Counter("evostream_sink_deletes", "conversation deletes applied (rows and texts)", registry=r)
        self.rejects = Counter("evostream_sink_rejects", "records kept in the rejects table", registry=r)
        self.batches = Counter("evostream_sink_batches", "transactions committed", registry=r)
        self.failures = Counter("evostream_sink_failed_batches", "transactions that failed (retried)", registry=r)
        self.batch_s = Histogram("evostream_sink_batch_seconds", "one batch: parse + transaction",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.lag = Gauge("evostream_sink_lag_records", "records in the topic not yet committed to the index",
                         ["topic", "partition"], registry=r)
        self.last_commit = Gauge("evostream_sink_last_commit_timestamp_seconds", "time of the last commit",
                                 registry=r)


@dataclass
class SinkTotals:
    batches: int = 0
    failures: int = 0
    stats: BatchStats = field(default_factory=BatchStats)
    seconds: float = 0.0


class Sink:
    """Feeds `index` from the topics; see the module doc."""

    def __init__(self, index: VectorIndex, bootstrap: str, embeddings_topic: str, turns_topic: str | None = None, *,
                 name: str = "evostream-sink", batch_max: int = 500, security: KafkaSecurity | None = None,
                 metrics: SinkMetrics | None = None, backoff: Backoff = Backoff()):
        self.index = index
        self.bootstrap = bootstrap
        self.embeddings_topic = embeddings_topic
        self.turns_topic = turns_topic
        self.name = name
        self.batch_max = batch_max
        self.security = security
        self.metrics = metrics if metrics is not None else SinkMetrics()
        self.backoff = backoff
        self.totals = SinkTotals()
        self._consumer: Any = None
        self._tps: list[Any] = []

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        if self._consumer is not None:
            return
        c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             client_id=f"evostream-sink-{uuid.uuid4().hex[:6]}", fetch_max_wait_ms=100,
                             max_partition_fetch_bytes=8 * 1024 * 1024,
                             **(self.security.client_kwargs() if self.security is not None else {}))
        await c.start()
        try:
            existing = await c.topics()  # a listing: a named lookup would auto-create the topic on tansu
            if self.embeddings_topic not in existing:
                raise TopicNotFound(f"topic {self.embeddings_topic!r} does not exist on the broker at {self.bootstrap}")
            topics = [self.embeddings_topic]
            if self.turns_topic:
                if self.turns_topic in existing:
                    topics.append(self.turns_topic)
                else:
                    log.warning("sink: turns topic %r does not exist: no texts", self.turns_topic)
            self._tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
            c.assign(self._tps)
            self._consumer = c
            await self._seek_to_stored()
        except BaseException:
            self._consumer = None
            await c.stop()
            raise

    async def stop(self) -> None:
        if self._consumer is not None:
            c, self._consumer = self._consumer, None
            await c.stop()

    async def __aenter__(self) -> "Sink":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _seek_to_stored(self) -> None:
        stored = await asyncio.to_thread(self.index.offsets, self.name)
        for tp in self._tps:
            nxt = stored.get((tp.topic, tp.partition))
            if nxt is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, nxt)

    # -- one batch ---------------------------------------------------------------------------
    def _parse(self, batch: dict[Any, list[Any]]) -> list[Record]:
        out: list[Record] = []
        for tp, msgs in batch.items():
            for m in msgs:
                if tp.topic == self.embeddings_topic:
                    op = parse_embedding_record(tp.topic, tp.partition, m.offset, m.key, m.value, m.headers)
                else:
                    op = parse_turn_record(m.key, m.value)
                out.append((tp.topic, tp.partition, m.offset, op))
        return out

    async def step(self, timeout_ms: int = 500) -> int:
        """Fetch at most `batch_max` records and commit them with their offsets; returns how
        many records were committed (0: nothing arrived, or the transaction failed and the
        partitions were sought back to the stored offsets)."""
        if self._consumer is None:
            await self.start()
        batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=self.batch_max)
        if not batch:
            return 0
        t0 = time.perf_counter()
        records = self._parse(batch)
        try:
            stats = await asyncio.to_thread(self.index.apply, self.name, records)
        except Exception as exc:  # noqa: BLE001 - the transaction rolled back: read the batch again
            self.totals.failures += 1
            self.metrics.failures.inc()
            delay = self.backoff.delay(self.totals.failures)
            log.warning("sink: batch of %d records not committed (%s: %s); retrying from the stored offsets in %.1fs",
                        len(records), type(exc).__name__, str(exc).strip().splitlines()[0][:300] if str(exc) else "",
                        delay)
            await asyncio.sleep(delay)
            await self._reseek_after_failure()
            return 0
        self.totals.batches += 1
        self.totals.stats.add(stats)
        m = self.metrics
        m.batches.inc()
        m.rows.inc(stats.upserts)
        m.deletes.inc(stats.deletes)
        m.rejects.inc(stats.rejected + stats.stale)
        for tp, msgs in batch.items():
            m.records.labels(topic=tp.topic).inc(len(msgs))
        m.batch_s.observe(time.perf_counter() - t0)
        m.last_commit.set(time.time())
        if stats.rejected or stats.stale:
            log.warning("sink: %d record(s) rejected (see the rejects table)", stats.rejected + stats.stale)
        return len(records)

    async def _reseek_after_failure(self) -> None:
        while True:
            try:
                await self._seek_to_stored()
                return
            except Exception as exc:  # noqa: BLE001 - the database is still away: keep waiting
                self.totals.failures += 1
                delay = self.backoff.delay(self.totals.failures)
                log.warning("sink: stored offsets not readable (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def refresh_lag(self) -> dict[tuple[str, int], int]:
        """Set the lag gauge: the broker's end offset minus the next offset to read."""
        out: dict[tuple[str, int], int] = {}
        if self._consumer is None:
            return out
        try:
            ends = await self._consumer.end_offsets(self._tps)
        except Exception as exc:  # noqa: BLE001 - a metric never stops the sink
            log.debug("sink: end offsets not available: %s", exc)
            return out
        for tp in self._tps:
            pos = await self._consumer.position(tp)
            lag = max(0, int(ends.get(tp, 0)) - int(pos))
            out[(tp.topic, tp.partition)] = lag
            self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
        return out

    # -- loops -------------------------------------------------------------------------------
    async def catch_up(self, *, idle_ms: int = 1000, max_wait_s: float = 120.0) -> SinkTotals:
        """Commit everything the topics hold now: until a fetch brings nothing for `idle_ms`
        (a broker's end offsets are a hint only: the local one reports the last batch's base)."""
        t0 = time.monotonic()
        await self.start()
        deadline = t0 + max_wait_s
        while time.monotonic() < deadline:
            got = await self.step(timeout_ms=idle_ms)
            if got == 0 and not self.totals.failures:
                break
            if got == 0:
                self.totals.failures = 0  # a failed batch was sought back: try again
        else:
            log.warning("sink: still receiving records after %.0fs; returning", max_wait_s)
        await self.refresh_lag()
        self.totals.seconds = time.monotonic() - t0
        return self.totals

    async def run(self, stop: asyncio.Event | None = None, *, lag_every_s: float = 5.0) -> SinkTotals:
        """Until `stop` is set: batches as they come; the lag gauge every `lag_every_s`."""
        t0 = time.monotonic()
        await self.start()
        next_lag = 0.0
        while stop is None or not stop.is_set():
            got = await self.step(timeout_ms=500)
            if got:
                self.totals.failures = 0
            if time.monotonic() >= next_lag:
                await self.refresh_lag()
                next_lag = time.monotonic() + lag_every_s
        self.totals.seconds = time.monotonic() - t0
        return self.totals


def open_index(s: Any, *, for_search: bool = False, cache_root: Any = None) -> VectorIndex:
    """The index the settings name: PostgreSQL when `sink_dsn` is set, else the SQLite file
    (`index_path`, else one per broker and topic under `cache_root`/index/: callers pass the
    cache directory, workers.tokenizer.cache_dir(), which this room does not import)."""
    if s.sink_dsn is not None:
        from stream.index.pgvector import PgVectorIndex

        dsn = (s.sink_search_dsn if for_search and s.sink_search_dsn is not None else s.sink_dsn).get_secret_value()
        return PgVectorIndex(dsn, schema=s.sink_schema, prefix=s.sink_table_prefix, rls=s.sink_rls,
                             ef_search=s.sink_hnsw_ef_search, create=not (for_search and s.sink_search_dsn),
                             application_name="evostream-search" if for_search else "evostream-sink")
    from pathlib import Path

    from stream.index.sqlite import SqliteIndex, default_index_path

    if s.index_path:
        return SqliteIndex(Path(s.index_path))
    if cache_root is None:
        raise ValueError("no sink_dsn and no index_path: open_index needs the cache directory")
    return SqliteIndex(default_index_path(Path(cache_root), s.kafka_bootstrap, s.embeddings_topic))


__all__ = ["Sink", "SinkMetrics", "SinkTotals", "TopicNotFound", "open_index"]
