"""A record batch the consumer cannot read stops its partition, not the worker.

Why this exists: aiokafka decodes a fetched record batch lazily, while faust drains it. If that
raises (a codec whose library is missing, a corrupt batch), the error escapes faust's fetch
loop, faust logs "We experienced a crash!" and the worker exits. The records were never
acknowledged, so every worker that takes the partition over fetches the same batch and dies
the same way: one producer setting stops the whole consumer group.

What happens instead, with `install()`:

* `GuardedPartitionRecords` replaces aiokafka's per-partition record iterator. When a batch
  cannot be read it stops *before* that batch (the consumer's position stays at the first
  unread offset, so nothing is skipped or lost) and reports the partition, the offset and the
  error to a sink. Records of the same fetch that came before the bad batch are delivered.
* The worker's sink (`UnreadableBatches`) logs once per partition and offset, counts it
  (`evostream_unreadable_batches_total`), shows it in the `evostream_partition_stopped`
  gauge and in `/readyz`; the guard pauses the partition in the consumer (after handing out
  the records before the bad batch) so it is not fetched again. Every other partition keeps
  flowing. A rebalance un-pauses it; whoever owns it then stops at the same offset again.
* Nothing is dead-lettered: the bytes could not be read, so there is nothing exact to keep;
  the batch stays on the topic. After the cause is fixed (install the codec library, or let
  retention/an operator move the group's offset past a corrupt batch), restarting the
  worker resumes the partition from its committed offset.

The test harness reproduces an unreadable batch on a healthy machine by making aiokafka
believe a codec's library is missing (devtools/faults.py, `EVOSTREAM_FAULT_DISABLE_CODECS`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiokafka.consumer import fetcher
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

CODECS = ("gzip", "snappy", "lz4", "zstd")

Sink = Callable[[str, int, int, BaseException], None]
"""(topic, partition, first unread offset, error)"""

_sinks: list[Sink] = []
_install_lock = threading.Lock()
_installed = False
_originals: tuple[type, type] | None = None


@dataclass(frozen=True)
class StoppedPartition:
    topic: str
    partition: int
    offset: int
    """First offset that could not be read (the consumer's position stays here)."""
    error: str
    since: float
    """Unix time the partition was stopped."""

    def as_dict(self) -> dict[str, object]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "error": self.error, "since": self.since}


def install(sink: Sink) -> None:
    """Guard every aiokafka consumer of this process and send unreadable batches to `sink`.

    Idempotent; several sinks may be registered (each is called)."""
    global _installed, _originals
    with _install_lock:
        if sink not in _sinks:
            _sinks.append(sink)
        if _installed:
            return

        class GuardedPartitionRecords(fetcher.PartitionRecords):  # type: ignore[misc, valid-type]
            """aiokafka's iterator, but a batch that cannot be read ends the iteration there
            (`next_fetch_offset` stays at its first offset) instead of raising into the
            consumer loop; the error is kept for `GuardedFetchResult`."""

            unreadable: BaseException | None = None

            def _unpack_records(self) -> Iterator[object]:
                try:
                    yield from super()._unpack_records()
                except Exception as exc:  # noqa: BLE001 - any decode failure: stop here
                    self.unreadable = exc

        class GuardedFetchResult(fetcher.FetchResult):  # type: ignore[misc, valid-type]
            """Hands out the records before an unreadable batch, then pauses the partition in
            the consumer itself (so it is not fetched again) and reports it. Pausing here,
            after the records were taken, matters: a pause seen by faust *before* it yields
            them would drop records the consumer's position has already moved past."""

            def _guarded(self, take: Callable[[], object]) -> object:
                records = self._partition_records
                out = take()
                exc = getattr(records, "unreadable", None)
                if exc is not None:
                    records.unreadable = None
                    tp = self._topic_partition
                    try:
                        self._assignment.state_value(tp).pause()
                    except Exception:  # noqa: BLE001 - unassigned meanwhile: the new owner sees it
                        pass
                    _report(tp.topic, tp.partition, records.next_fetch_offset, exc)
                return out

            def getone(self):  # type: ignore[no-untyped-def]
                return self._guarded(super().getone)

            def getall(self, max_records=None):  # type: ignore[no-untyped-def]
                return self._guarded(lambda: super(GuardedFetchResult, self).getall(max_records))

        _originals = (fetcher.PartitionRecords, fetcher.FetchResult)
        fetcher.PartitionRecords = GuardedPartitionRecords
        fetcher.FetchResult = GuardedFetchResult
        _installed = True


def uninstall_sink(sink: Sink) -> None:
    with _install_lock:
        if sink in _sinks:
            _sinks.remove(sink)


def uninstall() -> None:
    """Restore aiokafka's own classes and drop every sink (tests: compare with and without)."""
    global _installed, _originals
    with _install_lock:
        if _originals is not None:
            fetcher.PartitionRecords, fetcher.FetchResult = _originals
        _originals, _installed = None, False
        _sinks.clear()


def _report(topic: str, partition: int, offset: int, exc: BaseException) -> None:
    sinks = list(_sinks)
    if not sinks:
        log.error("unreadable record batch on %s[%d] at offset %d: %r (no sink installed)",
                  topic, partition, offset, exc)
    for sink in sinks:
        try:
            sink(topic, partition, offset, exc)
        except Exception:  # noqa: BLE001 - reporting must never break the fetch loop
            log.exception("unreadable-batch sink failed")


class UnreadableBatches:
    """The worker's record of partitions stopped on an unreadable batch.

    Thread-safe: `report` runs on the consumer's thread; `on_stop` is how the owner pauses
    the partition on its own event loop."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 on_stop: Callable[[StoppedPartition], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._stopped: dict[tuple[str, int], StoppedPartition] = {}
        self.on_stop = on_stop
        self.total = Counter("evostream_unreadable_batches_total",
                             "record batches that could not be read (partition stopped before them)",
                             ["partition"], registry=registry)
        self.gauge = Gauge("evostream_partition_stopped",
                           "1 while a partition is stopped on an unreadable record batch",
                           ["partition"], registry=registry)

    def report(self, topic: str, partition: int, offset: int, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:500]
        with self._lock:
            known = self._stopped.get((topic, partition))
            if known is not None and known.offset == offset:
                return  # refetched before the pause took effect: already reported
            stopped = StoppedPartition(topic, partition, offset, error, time.time())
            self._stopped[(topic, partition)] = stopped
        self.total.labels(partition=str(partition)).inc()
        self.gauge.labels(partition=str(partition)).set(1)
        log.error("partition %s[%d] stopped: the record batch at offset %d cannot be read (%s). The other "
                  "partitions keep flowing; nothing was skipped. Fix the cause (e.g. install the codec "
                  "library) and restart the worker to resume from offset %d.",
                  topic, partition, offset, error, offset)
        if self.on_stop is not None:
            self.on_stop(stopped)

    def forget(self, topic: str, partitions: set[int]) -> None:
        """Partitions revoked from this worker: their new owner reports for itself."""
        with self._lock:
            for p in partitions:
                if self._stopped.pop((topic, p), None) is not None:
                    self.gauge.labels(partition=str(p)).set(0)

    def stopped(self) -> list[StoppedPartition]:
        with self._lock:
            return sorted(self._stopped.values(), key=lambda s: (s.topic, s.partition))


__all__ = ["CODECS", "StoppedPartition", "UnreadableBatches",
           "install", "uninstall", "uninstall_sink"]


def watch_app(registry: CollectorRegistry | None = None) -> UnreadableBatches:
    """Guard this process's consumers and record unreadable batches for the worker
    (metrics in `registry`). The partition itself is paused by the guard, in the consumer."""
    batches = UnreadableBatches(registry)
    install(batches.report)
    return batches


__all__.append("watch_app")
