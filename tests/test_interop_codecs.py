"""Compressed record batches from other producers, end to end (issue #13).

Real broker, real Redis, real worker subprocesses. Turns are produced with aiokafka
`compression_type` gzip / snappy / lz4 / zstd (the codecs Kafka defines), each through the
broker, on a 2-partition turns topic:

* worker A runs with zstd made unavailable (the TEST-ONLY `EVOSTREAM_FAULT_DISABLE_CODECS`):
  the zstd batch on partition 0 cannot be read. Before issue #13 that crashed the worker
  ("We experienced a crash!") and every worker after it. Now A stops partition 0 *before*
  that batch, says so (log, `evostream_partition_stopped`, `/readyz` 503 with the offset),
  keeps embedding partition 1 (gzip, snappy, then lz4 produced after the stop), and
  dead-letters nothing;
* worker B (all codecs, output compressed with zstd) takes over: it resumes partition 0 at
  the zstd batch. Every conversation of every codec is then embedded exactly as offline.
* the reference indexer reads the (partly zstd-compressed) embeddings topic.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from schemas.events import TurnEvent
from stream.kafka.topics import run_sync

from support.oracle import TOL, Expected, check_outputs, compute_expected, metrics, read_dead_letters, wait_for_embeddings
from support.traffic import TopicMaker, Workers, pipeline_env, random_messages
from support.workers import PipelineEnv, WorkerProc, wait_for

TIMEOUT = 300.0
CODECS = ("gzip", "snappy", "lz4", "zstd")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def conversation(cid: str, n: int, seed: int) -> list[TurnEvent]:
    rng = random.Random(seed)
    return [TurnEvent(conversation_id=cid, seq=s, messages=random_messages(rng, words=(2, 12), long_turn_p=0.0),
                      timestamp=T0 + timedelta(seconds=s)) for s in range(n)]


async def _produce(bootstrap: str, topic: str, partition: int, turns: list[TurnEvent],
                   codec: str | None) -> list[int]:
    """All `turns` in one producer batch (linger) with `codec`; returns their offsets."""
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50, compression_type=codec)
    await prod.start()
    try:
        futs = [await prod.send(topic, t.model_dump_json().encode(), key=t.conversation_id.encode(),
                                partition=partition) for t in turns]
        return [(await f).offset for f in futs]
    finally:
        await prod.stop()


def produce(penv: PipelineEnv, partition: int, turns: list[TurnEvent], codec: str | None) -> list[int]:
    return run_sync(lambda: _produce(penv.kafka_bootstrap, penv.turns_topic, partition, turns, codec))


@dataclass
class Run:
    penv: PipelineEnv
    convs: dict[str, list[TurnEvent]]
    expected: Expected
    zstd_offset: int
    stopped_body: dict
    a_metrics: dict[str, float]
    a_log: str
    a_alive_after: bool
    a_keys_before_b: set
    b_metrics: dict[str, float]


def keys(convs: dict[str, list[TurnEvent]], *cids: str) -> set[tuple[str, int]]:
    return {(c, t.seq) for c in cids for t in convs[c]}


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    topics = TopicMaker(kafka_bootstrap, "interop-codecs")
    procs = Workers()
    logs = tmp_path_factory.mktemp("interop-codecs")
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2,
                            extra={"EVOSTREAM_API_AUTH": "off"})
        convs = {
            "plain-p0": conversation("plain-p0", 3, 1),
            "zstd-p0": conversation("zstd-p0", 4, 2),
            "after-p0": conversation("after-p0", 2, 3),
            "gzip-p1": conversation("gzip-p1", 3, 4),
            "snappy-p1": conversation("snappy-p1", 3, 5),
            "lz4-p1": conversation("lz4-p1", 3, 6),
        }
        produce(penv, 0, convs["plain-p0"], None)
        (zstd_offset, *_) = produce(penv, 0, convs["zstd-p0"], "zstd")
        produce(penv, 0, convs["after-p0"], None)
        produce(penv, 1, convs["gzip-p1"], "gzip")
        produce(penv, 1, convs["snappy-p1"], "snappy")

        # A's output codec must not be the one it cannot use (the worker refuses to start so).
        a_env = PipelineEnv(**{**penv.__dict__, "extra": {**penv.extra, "EVOSTREAM_FAULT_DISABLE_CODECS": "zstd",
                                                          "EVOSTREAM_OUTPUT_COMPRESSION": "gzip"}})
        a = procs.add(WorkerProc(a_env, logs, "a").start())
        expected = compute_expected({cid: [t.to_turn_input() for t in ts] for cid, ts in convs.items()})
        wait_for_embeddings(penv, keys(convs, "plain-p0", "gzip-p1", "snappy-p1"), timeout=TIMEOUT, workers=[a])

        def stopped() -> dict | None:
            code, body = a.get("/readyz")
            return body if code == 503 and body.get("stopped_partitions") else None

        stopped_body = wait_for(stopped, 60, 0.5, "partition 0 reported stopped")
        # Partition 1 keeps flowing after partition 0 stopped.
        produce(penv, 1, convs["lz4-p1"], "lz4")
        wait_for_embeddings(penv, keys(convs, "lz4-p1"), timeout=TIMEOUT, workers=[a])
        a_alive_after = a.alive()
        a_metrics = metrics(a)
        from support.oracle import read_outputs

        a_keys = set(read_outputs(penv.kafka_bootstrap, penv.embeddings_topic).embeddings)
        a.stop()
        a_log = a.log_path.read_text(errors="replace")

        b_env = PipelineEnv(**{**penv.__dict__, "extra": {**penv.extra, "EVOSTREAM_OUTPUT_COMPRESSION": "zstd"}})
        b = procs.add(WorkerProc(b_env, logs, "b").start())
        wait_for_embeddings(penv, expected.keys(), timeout=TIMEOUT, workers=[b])
        yield Run(penv, convs, expected, zstd_offset, stopped_body, a_metrics, a_log, a_alive_after, a_keys,
                  metrics(b))
    finally:
        procs.stop_all()
        topics.close()


def test_unreadable_batch_stops_only_its_partition(run: Run) -> None:
    assert run.a_alive_after, "worker A died on the unreadable batch:\n" + run.a_log[-3000:]
    assert "We experienced a crash" not in run.a_log
    (stopped,) = run.stopped_body["stopped_partitions"]
    assert stopped["topic"] == run.penv.turns_topic and stopped["partition"] == 0
    assert stopped["offset"] == run.zstd_offset, stopped
    assert "zstd" in stopped["error"], stopped
    assert run.stopped_body["ready"] is False
    assert run.a_metrics.get('evostream_partition_stopped{partition="0"}') == 1, run.a_metrics
    assert run.a_metrics.get('evostream_unreadable_batches_total{partition="0"}', 0) >= 1
    assert not run.a_metrics.get('evostream_partition_stopped{partition="1"}')
    assert "cannot be read" in run.a_log and f"offset {run.zstd_offset}" in run.a_log


def test_nothing_behind_the_unreadable_batch_was_skipped(run: Run) -> None:
    # A embedded what came before the bad batch and nothing after it on that partition.
    assert keys(run.convs, "plain-p0") <= run.a_keys_before_b
    assert not (keys(run.convs, "zstd-p0", "after-p0") & run.a_keys_before_b), run.a_keys_before_b
    # ... and lost nothing: the unreadable batch was neither skipped nor dead-lettered.
    assert read_dead_letters(run.penv.kafka_bootstrap, run.penv.dead_letter_topic) == []


@pytest.mark.parametrize("codec", CODECS)
def test_turns_produced_with_codec_are_embedded_as_offline(run: Run, codec: str) -> None:
    cid = next(c for c in run.convs if c.startswith(codec))
    rep = check_outputs(run.penv, run.expected, keys=keys(run.convs, cid), cids=[cid])
    assert not rep.problems(allow_duplicates=False), rep.summary()
    assert rep.events == len(run.convs[cid]) and rep.states_checked == len(run.convs)


def test_every_conversation_equal_to_offline_after_takeover(run: Run) -> None:
    rep = check_outputs(run.penv, run.expected)
    assert not rep.problems(allow_duplicates=False), rep.summary()
    assert run.b_metrics.get("evostream_turns_applied_total") == len(
        keys(run.convs, "zstd-p0", "after-p0")), "worker B re-applied or missed turns"


def test_sink_reads_compressed_embeddings(run: Run, tmp_path) -> None:
    """The sink (issue #19; into an SQLite index here) reads the partly zstd-compressed topic."""
    from stream.index.sink import Sink
    from stream.index.sqlite import SqliteIndex

    with SqliteIndex(tmp_path / "index.sqlite") as index:
        async def go():
            async with Sink(index, run.penv.kafka_bootstrap, run.penv.embeddings_topic) as sink:
                return await sink.catch_up()

        totals = run_sync(go)
        assert not totals.stats.rejected, index.rejects("evostream-sink")
        rows = {(r.conversation_id, r.seq): r.vector for r in index.rows()}
    assert rows.keys() == run.expected.keys()
    for key, ref in run.expected.embeddings.items():
        assert float(np.abs(rows[key] - ref).max()) <= 1e-4, key