"""One index interface, two backends (issue #19): the same checks against PostgreSQL + pgvector
(the bundled server) and SQLite + numpy, fed by the real broker through the same `Sink`.
The PostgreSQL-only behaviour (kill -9, row-level security, HNSW) is in tests/test_sink_pg.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from stream.index.base import SearchQuery, VectorIndex
from stream.index.sink import Sink, SinkMetrics, TopicNotFound
from tests.support.pg import PgTarget
from tests.support.sink import differences, embedding, expected_rows, synthetic_traffic, table_of
from tests.support.workers import read_topic_sync
from tests.test_sink_pg import produce


@pytest.fixture(params=["postgres", "sqlite"])
def index(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "postgres":
        from stream.index.pgvector import PgVectorIndex

        target: PgTarget = request.getfixturevalue("pg_target")
        idx: VectorIndex = PgVectorIndex(target.dsn, schema=target.schema)
    else:
        from stream.index.sqlite import SqliteIndex

        idx = SqliteIndex(tmp_path / "index.sqlite")
    try:
        yield idx
    finally:
        idx.close()


def sink_run(index: VectorIndex, bootstrap: str, topic: str, *, batch_max: int = 50, name: str = "s",
             metrics: SinkMetrics | None = None):
    async def go():
        async with Sink(index, bootstrap, topic, name=name, batch_max=batch_max, metrics=metrics) as s:
            return await s.catch_up(idle_ms=800)

    return asyncio.run(go())


def test_table_equals_the_topic_and_offsets_are_stored(index: VectorIndex, kafka_bootstrap, topic_factory) -> None:
    topic = topic_factory(3)
    produce(kafka_bootstrap, topic, synthetic_traffic(10, 12, seed=11))
    metrics = SinkMetrics()
    totals = sink_run(index, kafka_bootstrap, topic, metrics=metrics)
    msgs = read_topic_sync(kafka_bootstrap, topic)
    assert differences(table_of(index.rows()), expected_rows(msgs)) == []
    ends: dict = {}
    for m in msgs:
        ends[(topic, m.partition)] = m.offset + 1
    assert index.offsets("s") == ends
    assert totals.stats.records == len(msgs) and totals.batches >= len(msgs) // 50
    # the lag gauge: nothing left to read; the counters saw every record
    assert {s.labels["partition"]: s.value for s in metrics.lag.collect()[0].samples} == \
        {str(p): 0.0 for p in range(3)}
    assert metrics.records.labels(topic=topic)._value.get() == len(msgs)
    # a second run reads nothing: it starts at the stored offsets
    assert sink_run(index, kafka_bootstrap, topic).stats.records == 0


def test_rejects_keep_bad_records_with_a_reason_and_the_sink_goes_on(index: VectorIndex, kafka_bootstrap,
                                                                     topic_factory) -> None:
    topic = topic_factory(1)
    good = embedding("a", 0, memory="new", dim=8)
    other_dim = embedding("b", 0, memory="new", dim=4)
    produce(kafka_bootstrap, topic, [(b"a", b"not json", []), (b"a", good.model_dump_json().encode(), []),
                                     (b"b", other_dim.model_dump_json().encode(), []),
                                     (b"zzz", good.model_dump_json().encode(), [])])
    sink_run(index, kafka_bootstrap, topic)
    assert [r.key for r in index.rows()] == [("", "a", 1, 0)]
    assert [(o, reason) for _t, _p, o, reason in index.rejects("s")] == [
        (0, "json_invalid"), (2, "dim_mismatch"), (3, "key_mismatch")]


def test_exact_search_is_the_same_on_both_backends(index: VectorIndex, kafka_bootstrap, topic_factory) -> None:
    topic = topic_factory(2)
    rng = np.random.default_rng(4)
    recs = [(f"c{c}".encode(), embedding(f"c{c}", s, tenant="t", seed=int(rng.integers(1 << 30)),
                                         memory="new" if s == 0 else "continued").model_dump_json().encode(), [])
            for c in range(4) for s in range(5)]
    produce(kafka_bootstrap, topic, recs)
    sink_run(index, kafka_bootstrap, topic)
    q = rng.standard_normal(8).astype(np.float32)
    rows = index.rows("t")
    scores = {(r.conversation_id, r.seq): float(r.vector @ q / np.linalg.norm(r.vector) / np.linalg.norm(q))
              for r in rows}
    want = sorted(scores, key=lambda k: (-scores[k], k))
    hits = index.search(SearchQuery(vector=q, checkpoint="ck", tenant="t", k=6, exact=True))
    assert [(h.conversation_id, h.seq) for h in hits] == want[:6]
    assert [round(h.score, 5) for h in hits] == [round(scores[k], 5) for k in want[:6]]
    one = index.search(SearchQuery(vector=q, checkpoint="ck", tenant="t", conversation_id="c2", k=3))
    assert [(h.conversation_id, h.seq) for h in one] == [k for k in want if k[0] == "c2"][:3]
    assert index.search(SearchQuery(vector=q, checkpoint="ck", k=6)) == []          # another tenant
    assert index.search(SearchQuery(vector=q, checkpoint="other", tenant="t")) == []  # another model


def test_missing_topic_is_a_clear_error(index: VectorIndex, kafka_bootstrap) -> None:
    with pytest.raises(TopicNotFound, match="does not exist"):
        sink_run(index, kafka_bootstrap, "no.such.topic.for.the.sink")


def test_lag_gauge_counts_what_the_sink_has_not_committed(index: VectorIndex, kafka_bootstrap, topic_factory) -> None:
    from aiokafka import AIOKafkaProducer

    topic = topic_factory(1)
    metrics = SinkMetrics()

    async def go() -> tuple[dict, dict]:
        async with Sink(index, kafka_bootstrap, topic, name="lag", metrics=metrics) as s:
            await s.catch_up(idle_ms=500)
            p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)
            await p.start()
            try:
                for i in range(5):   # one record per batch: the local broker's end offset is exact then
                    ev = embedding("a", i, memory="new" if i == 0 else "continued")
                    await p.send_and_wait(topic, ev.model_dump_json().encode(), key=b"a")
            finally:
                await p.stop()
            behind = await s.refresh_lag()
            await s.catch_up(idle_ms=500)
            return behind, await s.refresh_lag()

    behind, after = asyncio.run(go())
    assert behind == {(topic, 0): 5} and after == {(topic, 0): 0}
    assert metrics.lag.labels(topic=topic, partition="0")._value.get() == 0
