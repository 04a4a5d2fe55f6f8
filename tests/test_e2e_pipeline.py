"""Acceptance tests of the streaming pipeline, end to end and nothing mocked.

A real broker (tansu) and a real Redis (valkey) from conftest, `evostream worker`
subprocesses, generated conversations produced interleaved and keyed by conversation id. The
oracle (tests/support/oracle.py) steps every conversation alone, offline; every embedding
event and every Redis checkpoint must equal it within 1e-5, whatever the worker did in between
(micro-batches mixing conversations, state cache, restarts, SIGKILL, a second worker).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from schemas.events import QueryResponse
from schemas.vectors import decode_vector

from support.oracle import (
    TOL,
    Expected,
    OutputReport,
    check_outputs,
    expected_for,
    load_states,
    metric,
    offline_engine,
    read_dead_letters,
    wait_for_embeddings,
)
from support.traffic import (
    TopicMaker,
    Traffic,
    Workers,
    generate_traffic,
    pipeline_env,
    produce,
)
from support.workers import PipelineEnv, WorkerProc, wait_for

APPLIED = "evostream_turns_applied_total"
# Generous: a 2-core machine shared with other test runs may be several times slower than usual.
ALL_DONE_TIMEOUT = 600.0


# --------------------------------------------------------------------------- 20 x 40, one worker


@dataclass
class BigRun:
    penv: PipelineEnv
    worker: WorkerProc
    traffic: Traffic
    expected: Expected
    report: OutputReport
    applied: float


@pytest.fixture(scope="module")
def big_run(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """20 conversations x 40 turns through one worker (one start, one produce); the worker
    stays up for the query test."""
    topics = TopicMaker(kafka_bootstrap, "e2e-20x40")
    procs = Workers()
    try:
        # A smaller padded-token budget per forward pass than the default 32768: on CPU, wide
        # padded passes over long memory rows cost ~3x the same turns in narrow passes (same
        # numbers either way); passes still mix several conversations.
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=4,
                            extra={"EVOSTREAM_MAX_BATCH_TOKENS": "4096"})
        worker = procs.add(WorkerProc(penv, tmp_path_factory.mktemp("e2e-big"), "big").start())
        traffic = generate_traffic(20, 40, seed=101, prefix="big")
        t0 = time.monotonic()
        produced = produce(kafka_bootstrap, penv.turns_topic, traffic.records())
        assert len({p.partition for p in produced}) == 4, "traffic should cover every partition"
        expected = expected_for(traffic)  # offline, while the worker starts and works
        t_offline = time.monotonic() - t0
        worker.wait_ready()
        wait_for_embeddings(penv, traffic.keys(), timeout=ALL_DONE_TIMEOUT, workers=[worker])
        t_all = time.monotonic() - t0
        report = check_outputs(penv, expected)
        print(f"20x40: offline expectation after {t_offline:.0f}s, all embeddings after {t_all:.0f}s")
        yield BigRun(penv, worker, traffic, expected, report, metric(worker, APPLIED, -1))
    finally:
        procs.stop_all()
        topics.close()


def test_every_turn_embedded_once_and_equal_to_offline(big_run: BigRun) -> None:
    rep, traffic = big_run.report, big_run.traffic
    assert len(traffic) == 800
    assert not rep.problems(allow_duplicates=False), rep.summary() + "\n" + big_run.worker.tail()
    assert rep.events == 800 and rep.duplicates == 0, rep.summary()
    assert rep.max_abs_diff <= TOL, rep.summary()
    assert rep.states_checked == 20, rep.summary()
    assert big_run.applied == 800, f"{APPLIED} = {big_run.applied}"
    engine = offline_engine()
    for evs in rep.outputs.embeddings.values():
        ev = evs[0]
        assert ev.checkpoint == engine.fingerprint and ev.dim == engine.embedding_dim
        assert ev.source.topic == big_run.penv.turns_topic
    assert read_dead_letters(big_run.penv.kafka_bootstrap, big_run.penv.dead_letter_topic) == []


def test_checkpoints_equal_offline_states(big_run: BigRun) -> None:
    states = load_states(big_run.penv, big_run.traffic.conversation_ids)
    for cid, want in big_run.expected.states.items():
        got = states[cid]
        assert got is not None, f"{cid}: no checkpoint"
        assert got.seq == 39 == want.seq
        assert got.snapshot_len == want.snapshot_len
        assert got.segment_token_ids == want.segment_token_ids
        assert got.latents.shape == want.latents.shape
        assert float((got.latents - want.latents).abs().max()) <= TOL


def _post_query(worker: WorkerProc, cid: str, query: str, **extra: str) -> QueryResponse:
    req = urllib.request.Request(worker.url + "/v1/query", method="POST",
                                 data=json.dumps({"conversation_id": cid, "query": query, **extra}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        return QueryResponse.model_validate_json(r.read())


def test_query_after_turns_matches_offline(big_run: BigRun) -> None:
    engine = offline_engine()
    cases = [(cid, q) for cid, q in zip(big_run.traffic.conversation_ids[::7],
                                        ["what did we say about the river?", "kafka batch vector", "東京 café 🙂"])]
    for cid, query in cases:
        resp = _post_query(big_run.worker, cid, query)
        state = big_run.expected.states[cid]
        want = engine.embed_queries([(state, query)])[0]
        got = decode_vector(resp.vector)
        assert resp.conversation_id == cid
        assert resp.applied_seq == big_run.traffic.by_id[cid].last_seq == 39
        assert resp.memory_len == state.memory_len
        assert resp.checkpoint == engine.fingerprint
        assert float(np.abs(got - want).max()) <= TOL, (cid, float(np.abs(got - want).max()))
    # A conversation the worker never saw: 404 (tests/test_api.py), or, when asked for, the
    # query is embedded against no memory.
    resp = _post_query(big_run.worker, "never-seen", "hello", unknown_conversation="memoryless")
    assert resp.applied_seq == -1 and resp.memory_len == 0
    want = engine.embed_queries([(None, "hello")])[0]
    assert float(np.abs(decode_vector(resp.vector) - want).max()) <= TOL


# --------------------------------------------------------------------------- restarts


def _progress(penv: PipelineEnv, traffic: Traffic) -> int:
    """Turns applied according to the checkpoints."""
    states = load_states(penv, traffic.conversation_ids)
    return sum(st.seq + 1 for st in states.values() if st is not None)


def test_restarts_mid_stream_continue_from_checkpoints(kafka_bootstrap: str, redis_url: str,
                                                       topic_factory, tmp_path: Path) -> None:
    """Stop the worker twice in the middle of the stream, with a backlog each time: first
    SIGTERM (graceful shutdown), then SIGKILL (no shutdown code runs). More turns are published
    while it is down. Afterwards every turn is embedded, equal to offline, and every checkpoint
    equals the offline state; replays may duplicate an event, but only byte-identically."""
    penv = pipeline_env(topic_factory, kafka_bootstrap, redis_url, partitions=2,
                        extra={"EVOSTREAM_BATCH_MAX_TURNS": "4"})  # many small commits to stop between
    traffic = generate_traffic(6, 12, seed=202, prefix="restart")
    records = traffic.records()
    n = len(records)
    chunks = [records[: n * 4 // 10], records[n * 4 // 10: n * 7 // 10], records[n * 7 // 10:]]
    procs = Workers()
    notes = []
    try:
        worker = procs.add(WorkerProc(penv, tmp_path, "restart"))
        worker.start()
        produce(kafka_bootstrap, penv.turns_topic, chunks[0])
        worker.wait_ready()

        # 1. SIGTERM with part of the first chunk still to do.
        wait_for(lambda: _progress(penv, traffic) >= n // 6, timeout=ALL_DONE_TIMEOUT, interval=0.1,
                 what=f"{n // 6} turns checkpointed\n{worker.tail()}")
        worker.stop(timeout=60)
        assert worker.proc.returncode != -9, "SIGTERM did not stop the worker within 60 s (it was killed)"
        done = _progress(penv, traffic)
        notes.append(f"SIGTERM at {done}/{len(chunks[0])} published turns checkpointed")
        assert done < n

        # 2. Restart with a backlog, then SIGKILL with part of it still to do.
        produce(kafka_bootstrap, penv.turns_topic, chunks[1])
        worker.start()
        expected = expected_for(traffic)  # offline, while the worker restarts
        worker.wait_ready()
        wait_for(lambda: _progress(penv, traffic) >= done + 6, timeout=ALL_DONE_TIMEOUT, interval=0.1,
                 what=f"{done + 6} turns checkpointed\n{worker.tail()}")
        worker.kill()
        done = _progress(penv, traffic)
        notes.append(f"SIGKILL at {done}/{len(chunks[0]) + len(chunks[1])} published turns checkpointed")
        assert done < n

        # 3. Restart, publish the rest, everything must come out right.
        produce(kafka_bootstrap, penv.turns_topic, chunks[2])
        worker.start()
        worker.wait_ready()
        wait_for_embeddings(penv, traffic.keys(), timeout=ALL_DONE_TIMEOUT, workers=[worker])
        rep = check_outputs(penv, expected)
        skipped = metric(worker, "evostream_turns_duplicate_total")
        print("; ".join(notes) + f"; {skipped:.0f} replayed turns skipped after the SIGKILL; {rep.summary()}")
        assert not rep.problems(allow_duplicates=True), rep.summary() + "\n" + procs.logs()
        assert rep.states_checked == 6
        assert read_dead_letters(kafka_bootstrap, penv.dead_letter_topic) == []
    finally:
        procs.stop_all()


# --------------------------------------------------------------------------- two workers

_ASSIGNED = re.compile(r"partitions assigned \[([0-9, ]*)\]")


def _last_assignment(worker: WorkerProc) -> set[int] | None:
    found = _ASSIGNED.findall(worker.log_path.read_text(errors="replace")) if worker.log_path.exists() else []
    if not found:
        return None
    return {int(x) for x in found[-1].split(",") if x.strip()}


def test_two_workers_split_partitions_and_agree_with_offline(kafka_bootstrap: str, redis_url: str,
                                                             topic_factory, tmp_path: Path) -> None:
    penv = pipeline_env(topic_factory, kafka_bootstrap, redis_url, partitions=4)
    traffic = generate_traffic(12, 8, seed=303, prefix="pair")
    procs = Workers()
    try:
        w1 = procs.add(WorkerProc(penv, tmp_path, "a").start())
        w2 = procs.add(WorkerProc(penv, tmp_path, "b").start())
        w1.wait_ready()
        w2.wait_ready()

        def split() -> tuple[set[int], set[int]] | None:
            a, b = _last_assignment(w1), _last_assignment(w2)
            if a and b and not (a & b) and a | b == set(range(4)):
                return a, b
            return None

        a, b = wait_for(split, timeout=120, interval=0.5, what=f"both workers own partitions\n{procs.logs(30)}")
        produced = produce(kafka_bootstrap, penv.turns_topic, traffic.records())
        hit = {p.partition for p in produced}
        assert hit & a and hit & b, f"traffic partitions {hit} should reach both workers ({a}, {b})"
        expected = expected_for(traffic)
        wait_for_embeddings(penv, traffic.keys(), timeout=ALL_DONE_TIMEOUT, workers=[w1, w2])
        rep = check_outputs(penv, expected)
        applied = (metric(w1, APPLIED), metric(w2, APPLIED))
        print(f"assignments {sorted(a)} / {sorted(b)}; applied {applied}; {rep.summary()}")
        assert applied[0] > 0 and applied[1] > 0, f"both workers must process turns: {applied}\n{procs.logs()}"
        assert not rep.problems(allow_duplicates=True), rep.summary() + "\n" + procs.logs()
        assert rep.duplicates == 0 or not rep.non_identical
        assert sum(applied) >= len(traffic)
        assert rep.states_checked == 12
    finally:
        procs.stop_all()
