"""Readiness means "can serve queries"; ingestion is its own signal (issue #18 item 4).

Before: `/readyz` was 503 whenever a worker owned no partitions, so while a second worker
joined the group both answered 503 for the seconds the rebalance took (although both kept
answering queries), and the Kubernetes/compose probes on `/readyz` could take every pod out of
service. Now `/readyz` stays 200 through the rebalance; what the rebalance does to ingestion
shows in `/health`'s `ingestion` detail, in the `/readyz` body and in the
`evostream_ingestion_healthy` gauge. Two real worker processes, one consumer group.
"""

from __future__ import annotations

import threading
import time

from support.oracle import metrics, wait_for_embeddings
from support.traffic import TopicMaker, Workers, generate_traffic, pipeline_env, produce
from support.workers import WorkerProc


def _consuming(w: WorkerProc) -> bool:
    """The worker owns partitions and consumes them (old workers: /readyz 200)."""
    try:
        code, body = w.get("/readyz", timeout=3)
    except OSError:
        return False
    state = body.get("detail", body)
    ing = state.get("ingestion")
    return ing["state"] == "consuming" if ing else (code == 200 and bool(state.get("ready")))


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_readyz_stays_200_while_a_second_worker_joins(kafka_bootstrap: str, redis_url: str, tmp_path) -> None:
    topics = TopicMaker(kafka_bootstrap, "ready")
    procs = Workers()
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=4)
        a = procs.add(WorkerProc(penv, tmp_path, "a").start())
        traffic = generate_traffic(4, 2, seed=31, prefix="ready")
        produce(kafka_bootstrap, penv.turns_topic, traffic.records())
        _wait(lambda: _consuming(a), 180, "worker a consuming")
        wait_for_embeddings(penv, traffic.keys(), timeout=240, workers=[a])

        codes: list[int] = []
        stop = threading.Event()

        def poll() -> None:  # what a readiness probe sees on worker a during the join
            while not stop.is_set():
                try:
                    codes.append(a.get("/readyz", timeout=3)[0])
                except OSError:
                    codes.append(0)
                time.sleep(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        b = procs.add(WorkerProc(penv, tmp_path, "b").start())
        # b answers /readyz 200 as soon as it serves, before it owns anything
        _wait(lambda: (lambda r: r is not None and r[0] == 200)(_get(b)), 180, "worker b serving")
        _wait(lambda: _consuming(a) and _consuming(b), 120, "both workers consuming after the rebalance")
        time.sleep(1)
        stop.set()
        poller.join(10)
        assert codes and set(codes) == {200}, f"worker a's /readyz during the join: {sorted(set(codes))}"
        # ingestion is reported on its own: both consume, the gauge says so
        for w in (a, b):
            code, health = w.get("/health")
            assert code == 200 and health["ingestion"]["healthy"], health
            assert health["ingestion"]["partitions"], health
            assert metrics(w).get("evostream_ingestion_healthy") == 1.0
        parts = set(a.get("/health")[1]["ingestion"]["partitions"]) | set(b.get("/health")[1]["ingestion"]["partitions"])
        assert parts == {0, 1, 2, 3}
    finally:
        procs.stop_all()
        topics.close()


def _get(w: WorkerProc):
    try:
        return w.get("/readyz", timeout=3)
    except OSError:
        return None

