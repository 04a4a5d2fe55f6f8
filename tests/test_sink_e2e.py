"""The sink end to end (issue #19): a REAL worker (tiny model) emits with the Kafka Connect
conventions on (document-id header, plain float vectors, tombstone event + null record), the
sink indexes its topic into the REAL bundled PostgreSQL, and the worker's `POST /v1/search` and
`evostream search` rank through it; a delete on the turns topic removes the conversation's rows
and texts downstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

from schemas.events import OUTBOUND_EVENT_ADAPTER, EmbeddingEvent
from schemas.vectors import decode_vector
from stream.index.ops import render_turn_text
from stream.index.pgvector import PgVectorIndex
from stream.kafka.connect import HEADER_DOCUMENT_ID, HEADER_TENANT, HEADER_TYPE
from tests.support.oracle import wait_for_embeddings
from tests.support.pg import PgTarget
from tests.support.sink import differences, expected_rows, table_of
from tests.support.traffic import generate_traffic, pipeline_env, produce
from tests.support.workers import REPO, WorkerProc, read_topic_sync
from tests.test_sink_pg import catch_up


def idx_text(penv, target: PgTarget, cid: str, seq: int) -> str | None:
    with PgVectorIndex(target.dsn, schema=target.schema, create=False) as idx:
        return idx.text("acme", cid, seq)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_worker_to_postgres_to_search_with_connect_conventions(kafka_bootstrap, redis_url, topic_factory,
                                                               pg_target: PgTarget, tmp_path: Path) -> None:
    penv = pipeline_env(topic_factory, kafka_bootstrap, redis_url, partitions=2, extra={
        **pg_target.env(), "EVOSTREAM_OUTPUT_VECTOR_FORMAT": "floats", "EVOSTREAM_OUTPUT_TOMBSTONES": "both"})
    a = generate_traffic(3, 4, seed=1, prefix="acme", tenant="acme")
    b = generate_traffic(2, 3, seed=1, prefix="acme", tenant="globex")   # the same ids, another tenant
    worker = WorkerProc(penv, tmp_path).start()
    try:
        worker.wait_ready()
        produce(kafka_bootstrap, penv.turns_topic, a.records() + b.records())
        wait_for_embeddings(penv, a.keys() | b.keys(), timeout=180, workers=[worker])
        victim = a.conversations[0].conversation_id
        produce(kafka_bootstrap, penv.turns_topic, [(victim.encode(), json.dumps(
            {"type": "delete", "conversation_id": victim, "tenant": "acme",
             "timestamp": "2026-12-01T12:00:00Z"}).encode())])
        msgs = []
        for _ in range(60):
            msgs = read_topic_sync(kafka_bootstrap, penv.embeddings_topic, idle_ms=500)
            if any(m.value is None for m in msgs):
                break
        # -- the records as a Connect sink sees them ------------------------------------------
        embeddings = [m for m in msgs if m.value is not None and json.loads(m.value)["type"] == "embedding"]
        assert len(embeddings) >= len(a) + len(b)
        for m in embeddings:
            obj = json.loads(m.value)
            assert isinstance(obj["vector"], list) and len(obj["vector"]) == obj["dim"]
            assert dict(m.headers)[HEADER_DOCUMENT_ID].decode() == obj["document_id"]
            assert m.key == obj["conversation_id"].encode()
            ev = OUTBOUND_EVENT_ADAPTER.validate_json(m.value)   # our reader takes the float form back
            assert isinstance(ev, EmbeddingEvent) and ev.document_id == obj["document_id"]
        assert len({dict(m.headers)[HEADER_DOCUMENT_ID] for m in embeddings}) == len(a) + len(b)
        nulls = [m for m in msgs if m.value is None]
        events = [m for m in msgs if m.value is not None and json.loads(m.value)["type"] == "conversation_deleted"]
        assert len(nulls) == 1 and len(events) == 1 and nulls[0].key == victim.encode()
        assert dict(nulls[0].headers) == {HEADER_TYPE: b"conversation_deleted", HEADER_TENANT: b"acme",
                                          "evostream.deleted_through_seq": b"3"}
        assert msgs.index(nulls[0]) > msgs.index(events[0])

        # -- the sink, then the table against an independent read of the topic ----------------
        with PgVectorIndex(pg_target.dsn, schema=pg_target.schema) as idx:
            catch_up(idx, kafka_bootstrap, penv.embeddings_topic, name="evostream-sink", turns=penv.turns_topic)
            got = table_of(idx.rows())
            assert differences(got, expected_rows(msgs)) == []
            assert {k[:2] for k in got} == ({("acme", c.conversation_id) for c in a.conversations[1:]}
                                            | {("globex", c.conversation_id) for c in b.conversations})
            assert idx.text("acme", victim, 0) is None          # the delete reached the texts too
            survivor = a.conversations[1]
            first = survivor.turns[0].model_dump(mode="json")["messages"]
            assert idx.text("acme", survivor.conversation_id, 0) == render_turn_text(first)
            # the vectors in the table are the ones the worker emitted, bit for bit
            by_key = {(ev.tenant or "", ev.conversation_id, ev.generation, ev.seq): ev for ev in
                      (OUTBOUND_EVENT_ADAPTER.validate_json(m.value) for m in embeddings)}
            for key, vec in got.items():
                assert np.array_equal(vec, decode_vector(by_key[key].vector))

        # -- search through the index: HTTP route and CLI -------------------------------------
        cid = survivor.conversation_id
        code, body = post(worker.url + "/v1/search", {"query": "what did I ask?", "conversation_id": cid,
                                                      "tenant": "acme", "k": 3})
        assert code == 200, body
        assert body["index"] == "postgres" and body["memory"]["applied_seq"] == survivor.last_seq
        assert len(body["hits"]) == 3 and {h["conversation_id"] for h in body["hits"]} == {cid}
        assert all(h["text"] == idx_text(penv, pg_target, cid, h["seq"]) and h["text"] for h in body["hits"])
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True)
        code, body = post(worker.url + "/v1/search", {"query": "anything", "tenant": "globex", "k": 50})
        assert code == 200 and len(body["hits"]) == len(b)          # the whole tenant, nothing of acme
        assert {h["document_id"] for h in body["hits"]} <= {dict(m.headers)[HEADER_DOCUMENT_ID].decode()
                                                           for m in embeddings}
        code, body = post(worker.url + "/v1/search", {"query": "x", "scope": "conversation"})
        assert code == 422, body
        env = {**penv.env(), "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-m", "stream.cli", "search", "--url", worker.url, "-c", cid,
                              "--tenant", "acme", "-t", "what did I ask?", "-k", "2"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)
        assert [h["seq"] for h in hits] == [h["seq"] for h in post(worker.url + "/v1/search", {
            "query": "what did I ask?", "conversation_id": cid, "tenant": "acme", "k": 2})[1]["hits"]]
        # no sink running: `search` caught the index up first -- from the offsets stored with
        # the rows, so nothing was read twice
        assert "(+0 rows, 0 deletes, 0 texts" in out.stderr, out.stderr
    finally:
        worker.stop()
    assert os.path.exists(tmp_path)
