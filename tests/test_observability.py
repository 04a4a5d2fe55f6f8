"""Observability (issue #11): the consumer-lag gauge follows the assignment across a
rebalance (two real workers in one group), the worker says "ready: N partitions, listening on
URL", and /metrics carries the process/platform/GC collectors (query latency:
`evostream_api_request_seconds`, stream/api/, issue #9)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from schemas.events import TurnEvent
from stream.kafka.lag import LagGauge
from stream.clients.producer import produce_records
from tests.support.workers import PipelineEnv, WorkerProc, wait_for

PARTS = 4


# ---------------------------------------------------------------------------------------------
def _gauge() -> Gauge:
    return Gauge("lag_test", "lag", ["partition"], registry=CollectorRegistry())


def _exported(g: Gauge) -> dict[int, float]:
    return {int(s.labels["partition"]): s.value for m in g.collect() for s in m.samples}


def test_lag_gauge_follows_assignment_and_survives_a_failing_partition() -> None:
    g = _gauge()
    lag = LagGauge(g, "turns")
    lag.assign([0, 1, 2])
    for p, off in ((0, 9), (1, 4)):
        lag.processed(p, off)

    def highwater(p: int) -> int:
        if p == 1:
            raise AssertionError("Partition is not assigned")  # aiokafka's assertion
        return 20

    got = asyncio.run(lag.refresh(highwater, lambda p: 15))
    assert got == {0: 10, 2: 5}  # partition 1 skipped, the others still updated
    assert _exported(g) == {0: 10, 2: 5}
    # a rebalance: 0 lost, 3 gained; the lost partition disappears, offsets of 0 are forgotten
    lag.assign([2, 3])
    assert 0 not in _exported(g)
    lag.processed(0, 100)  # a late batch of a lost partition does not bring it back
    asyncio.run(lag.refresh(lambda p: 20, lambda p: 18))
    assert _exported(g) == {2: 2, 3: 2}
    lag.revoke([2])
    assert _exported(g) == {3: 2}


# ---------------------------------------------------------------------------------------------
def _lag_metrics(w: WorkerProc) -> dict[int, float]:
    with urllib.request.urlopen(w.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {int(p): float(v) for p, v in re.findall(r'^evostream_consumer_lag\{partition="(\d+)"\} (\S+)$', text, re.M)}


def _metrics_text(w: WorkerProc) -> str:
    with urllib.request.urlopen(w.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def _produce_turns(penv: PipelineEnv, convs: int, seqs: range) -> None:
    now = datetime.now(timezone.utc)
    records = [(f"lag-c{i}".encode(), TurnEvent(conversation_id=f"lag-c{i}", seq=seq, timestamp=now,
                                                 messages=[{"role": "user", "content": f"turn {seq} of {i}"}])
                .model_dump_json().encode())
               for seq in seqs for i in range(convs)]
    asyncio.run(produce_records(records, bootstrap=penv.kafka_bootstrap, topic=penv.turns_topic, progress=False))


def test_lag_gauge_across_a_rebalance_with_two_workers(kafka_bootstrap: str, redis_url: str, topic_factory,
                                                       tmp_path: Path) -> None:
    penv = PipelineEnv(kafka_bootstrap, redis_url, topic_factory(PARTS), topic_factory(PARTS), topic_factory(1),
                       PARTS)
    a = WorkerProc(penv, tmp_path, "a").start()
    b = WorkerProc(penv, tmp_path, "b")
    try:
        a.wait_ready(timeout=180)
        _produce_turns(penv, 16, range(0, 2))
        # a owns every partition: all four exported, drained to 0
        wait_for(lambda: _lag_metrics(a) == {p: 0.0 for p in range(PARTS)}, timeout=180, interval=1.0,
                 what="worker a exporting lag 0 for all partitions")
        assert re.search(rf"ready: {PARTS} partitions of {re.escape(penv.turns_topic)} .*listening on "
                         rf"http://127\.0\.0\.1:{a.port}", a.log_path.read_text())

        b.start()
        b.wait_ready(timeout=180)

        def split() -> tuple[set[int], set[int]] | None:
            la, lb = set(_lag_metrics(a)), set(_lag_metrics(b))
            if la and lb and not (la & lb) and la | lb == set(range(PARTS)):
                return la, lb
            return None

        la, lb = wait_for(split, timeout=120, interval=1.0, what="lag partitions split between a and b")
        assert re.search(rf"ready: {len(lb)} partitions? of .*listening on http://127\.0\.0\.1:{b.port}",
                         b.log_path.read_text())
        # new traffic on every partition is processed by its new owner and drains to 0 on both
        _produce_turns(penv, 16, range(2, 4))
        wait_for(lambda: _lag_metrics(a) == {p: 0.0 for p in la} and _lag_metrics(b) == {p: 0.0 for p in lb},
                 timeout=180, interval=1.0, what="lag drained on both workers")
    finally:
        b.stop()
        a.stop()


def test_process_platform_and_query_metrics_are_exported() -> None:
    from stream.runtime.metrics import Metrics

    text = Metrics().render().decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info",
                 "python_gc_objects_collected_total", "evostream_turns_applied_total"):
        assert name in text, name


def test_json_logs_carry_conversation_partition_offset() -> None:
    import json
    import logging

    import pytest

    from stream.runtime.logs import JsonFormatter, fields

    rec = logging.LogRecord("stream.processing.pipeline", logging.WARNING, __file__, 1, "dead-letter %s", ("x",), None)
    rec.__dict__.update(fields(conversation_id="c1", tenant=None, partition=3, offset=42, reason_code="invalid_json"))
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "dead-letter x"
    assert (out["conversation_id"], out["partition"], out["offset"], out["reason_code"]) == ("c1", 3, 42,
                                                                                             "invalid_json")
    assert "tenant" not in out  # None values are left out
    with pytest.raises(ValueError, match="unknown log fields"):
        fields(conversation="c1")
