"""The query-ready memory in a real worker (issue #22): on by default, queries over HTTP read it
and equal the offline (uncached) numbers, and a rebalance drops it on the worker that lost
partitions, after which the answers are still the same. Real tansu broker, real valkey."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support.traffic import generate_traffic, produce
from tests.support.oracle import TOL, expected_for, metrics, offline_engine, wait_for_embeddings
from tests.support.workers import PipelineEnv, WorkerProc, wait_for

PARTS = 4
QUESTION = "which order was charged twice?"


def _query(worker: WorkerProc, cid: str) -> np.ndarray:
    body = json.dumps({"model": "evoembedding", "input": QUESTION, "conversation_id": cid,
                       "encoding_format": "base64"}).encode()
    req = urllib.request.Request(worker.url + "/v1/embeddings", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        got = json.loads(r.read())
    return np.frombuffer(base64.b64decode(got["data"][0]["embedding"]), dtype="<f4")


def _want(exp, cid: str) -> np.ndarray:
    return offline_engine().embed_queries([(exp.states[cid], QUESTION)])[0]


def _m(worker: WorkerProc, name: str) -> float:
    return metrics(worker).get(name, 0.0)


@pytest.mark.slow  # two worker starts and a rebalance: about 1.5 min on the shared 2-core machine
def test_queries_read_the_ready_memory_and_a_revoke_drops_it(kafka_bootstrap: str, redis_url: str, topic_factory,
                                                             tmp_path: Path) -> None:
    penv = PipelineEnv(kafka_bootstrap, redis_url, topic_factory(PARTS), topic_factory(PARTS), topic_factory(1),
                       PARTS, extra={"EVOSTREAM_API_AUTH": "off"})
    traffic = generate_traffic(6, 5, seed=2207, prefix="qr")
    exp = expected_for(traffic)
    a = WorkerProc(penv, tmp_path, "a").start()
    b = WorkerProc(penv, tmp_path, "b")
    try:
        a.wait_ready(timeout=180)
        produce(kafka_bootstrap, penv.turns_topic, traffic.records())
        wait_for_embeddings(penv, traffic.keys(), timeout=300, workers=[a])
        assert _m(a, 'evostream_cache_budget_bytes{cache="query"}') > 0      # on by default (auto)
        assert _m(a, 'evostream_cache_budget_bytes{cache="prefix"}') > 0
        wait_for(lambda: _m(a, "evostream_query_cache_bytes") > 0, timeout=30, what="ready memories kept")
        hits0 = _m(a, 'evostream_query_cache_events_total{event="hit"}')
        for cid in traffic.conversation_ids:
            d = float(np.abs(_query(a, cid) - _want(exp, cid)).max())
            assert d <= TOL, f"{cid}: query differs from the uncached offline one by {d}"
        assert _m(a, 'evostream_query_cache_events_total{event="hit"}') - hits0 >= len(traffic.conversation_ids)

        b.start()
        b.wait_ready(timeout=180)
        # a was revoked (every partition, then given some back): its ready memories are gone
        wait_for(lambda: _m(a, "evostream_query_cache_bytes") == 0, timeout=60, what="a's query cache dropped")
        for w in (a, b):
            for cid in traffic.conversation_ids:
                d = float(np.abs(_query(w, cid) - _want(exp, cid)).max())
                assert d <= TOL, f"{cid} on {w.name} after the rebalance: differs by {d}"
    finally:
        b.stop()
        a.stop()
