"""The reference indexer (stream/index/indexer.py) and the query client (stream/clients/query_client.py).

* `VectorIndex` unit tests: idempotent re-adds, deletes, cosine ranking, ties, k, checkpoints.
* `query_worker` / `query_worker_async` error messages against a refusing port and a stub
  HTTP server (4xx/5xx with the server's error body).
* `IndexerConsumer` against the real broker: unparseable records are skipped and counted,
  duplicates are idempotent, tombstones delete, consumer-group mode resumes where it committed.
* End to end with a real `evostream worker` subprocess: produce conversations, then
  `search_end_to_end` must rank exactly like an offline run of the engine (the conversation
  stepped alone + `engine.embed_queries`), and a delete must remove the conversation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from schemas.events import (
    ConversationDelete,
    ConversationDeleted,
    EmbeddingEvent,
    QueryResponse,
    SourceRef,
    StageTimings,
)
from schemas.vectors import decode_vector, encode_vector
from stream.index.indexer import (
    IndexerConsumer,
    TopicNotFound,
    VectorIndex,
    build_index,
    parse_outbound,
    search_end_to_end,
    turn_texts,
)
from stream.clients.producer import produce_records, turn_events
from stream.clients.query_client import QueryError, query_url, query_worker, query_worker_async
from tests.support.workers import REPO, PipelineEnv, WorkerProc, free_port, wait_for

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)


def emb(cid: str, seq: int, vec, *, checkpoint: str = "ck-a", memory_len: int = 0) -> EmbeddingEvent:
    v = np.asarray(vec, dtype=np.float32)
    return EmbeddingEvent(conversation_id=cid, seq=seq, vector=encode_vector(v), dim=v.shape[0], model="m",
                          checkpoint=checkpoint, memory_len=memory_len,
                          source=SourceRef(topic="turns", partition=0, offset=seq),
                          timings=StageTimings(queue_ms=0, step_ms=0, checkpoint_ms=0), produced_at=NOW)


def tomb(cid: str, through: int | None = None) -> ConversationDeleted:
    return ConversationDeleted(conversation_id=cid, deleted_through_seq=through, at=NOW)


# ---------------------------------------------------------------------------------------------
# VectorIndex
# ---------------------------------------------------------------------------------------------
def test_readd_same_key_is_idempotent() -> None:
    idx = VectorIndex()
    assert idx.add(emb("c", 0, [1, 0, 0]))
    assert idx.add(emb("c", 1, [0, 1, 0]))
    for _ in range(3):  # replays / at-least-once redelivery
        assert not idx.add(emb("c", 1, [0, 1, 0]))
    assert len(idx) == 2 and idx.seqs("c") == [0, 1]
    assert idx.stats.added == 2 and idx.stats.replaced == 3
    hits = idx.search("c", np.array([0, 1, 0], np.float32), k=10)
    assert [h.seq for h in hits] == [1, 0]  # no duplicate hits
    # a re-add replaces (the newest copy wins) rather than adding a second entry
    idx.add(emb("c", 1, [0, 0, 1]))
    assert len(idx) == 2
    assert idx.search("c", np.array([0, 0, 1], np.float32), k=1)[0].seq == 1


def test_delete_removes_only_that_conversation_and_id_can_be_reused() -> None:
    idx = VectorIndex()
    for seq in range(3):
        idx.add(emb("a", seq, [1, seq, 0]))
        idx.add(emb("b", seq, [1, seq, 0]))
    assert idx.apply_delete(tomb("a", 2)) == 3
    assert "a" not in idx.conversations() and ("a", 0) not in idx
    assert idx.search("a", np.ones(3, np.float32), k=5) == []
    assert idx.seqs("b") == [0, 1, 2]
    assert idx.apply_delete(tomb("a")) == 0  # deleting twice / an unknown conversation is harmless
    assert idx.stats.deletes == 2 and idx.stats.removed == 3
    # embeddings read after the tombstone belong to the id's new life
    idx.apply(emb("a", 0, [0, 1, 0]))
    assert idx.seqs("a") == [0]


def test_ranking_is_cosine_not_dot_product() -> None:
    idx = VectorIndex()
    vecs = {0: [10.0, 0.0, 0.0], 1: [1.0, 1.0, 0.0], 2: [0.0, 0.2, 0.0], 3: [-1.0, 0.5, 0.0], 4: [0.3, 1.0, 0.1]}
    for seq, v in vecs.items():
        idx.add(emb("c", seq, v))
    q = np.array([0.2, 1.0, 0.0], np.float32)  # unnormalised on purpose
    hits = idx.search("c", q, k=5)

    def cos(v):
        v = np.asarray(v, np.float64)
        return float(v @ q / np.linalg.norm(v) / np.linalg.norm(q))

    expected = sorted(vecs, key=lambda s: (-cos(vecs[s]), s))
    assert [h.seq for h in hits] == expected
    for h in hits:
        assert h.score == pytest.approx(cos(vecs[h.seq]), abs=1e-6)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # seq 2 is short but points along q's main axis: cosine ranks it above the long seq 0
    assert expected.index(2) < expected.index(0)


def test_ties_are_broken_by_seq() -> None:
    idx = VectorIndex()
    for seq in (7, 2, 5, 0):
        idx.add(emb("c", seq, [1.0, 2.0, 3.0]))
    idx.add(emb("c", 3, [3.0, 2.0, 1.0]))
    hits = idx.search("c", np.array([1.0, 2.0, 3.0], np.float32), k=5)
    assert [h.seq for h in hits] == [0, 2, 5, 7, 3]


def test_k_limits_the_hits() -> None:
    idx = VectorIndex()
    for seq in range(6):
        idx.add(emb("c", seq, [1.0, float(seq), 0.5]))
    q = np.array([0.0, 1.0, 0.0], np.float32)
    assert len(idx.search("c", q, k=1)) == 1
    assert [h.seq for h in idx.search("c", q, k=3)] == [h.seq for h in idx.search("c", q, k=6)][:3]
    assert len(idx.search("c", q, k=100)) == 6
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        idx.search("c", q, k=0)
    assert idx.search("unknown", q, k=3) == []


def test_checkpoint_filter_texts_and_zero_vectors() -> None:
    idx = VectorIndex()
    idx.add(emb("c", 0, [1, 0], checkpoint="old"))
    idx.add(emb("c", 1, [1, 0.1], checkpoint="new"))
    idx.add(emb("c", 2, [0, 0], checkpoint="new"))
    q = np.array([1, 0], np.float32)
    assert [h.seq for h in idx.search("c", q, k=5, checkpoint="new")] == [1, 2]
    assert [h.seq for h in idx.search("c", q, k=5)] == [0, 1, 2]
    assert idx.search("c", q, k=5, checkpoint="other") == []
    hits = idx.search("c", q, k=2, checkpoint="new", texts={("c", 1): "user: hi"})
    assert hits[0].text == "user: hi" and hits[1].text is None and hits[1].score == 0.0
    with pytest.raises(ValueError, match="dim"):
        idx.search("c", np.ones(3, np.float32), k=1)


def test_parse_outbound_reasons() -> None:
    assert isinstance(parse_outbound(emb("c", 0, [1.0]).model_dump_json().encode()), EmbeddingEvent)
    assert isinstance(parse_outbound(tomb("c", 3).model_dump_json().encode()), ConversationDeleted)
    for raw, reason in [(None, "null value"), (b"{oops", "json_invalid"), (b'{"type": "turn"}', "union_tag_invalid"),
                        (b'{"type": "embedding", "seq": 1}', "missing")]:
        with pytest.raises(ValueError, match=reason):
            parse_outbound(raw)


def test_turn_texts() -> None:
    t = turn_texts([{"conversation_id": "c", "turns": [{"user": "u0", "assistant": "a0"}, {"assistant": "a1"}]}])
    assert t == {("c", 0): "user: u0\nassistant: a0", ("c", 1): "assistant: a1"}


# ---------------------------------------------------------------------------------------------
# query client errors
# ---------------------------------------------------------------------------------------------
class _Stub(BaseHTTPRequestHandler):
    replies: dict[str, tuple[int, bytes]] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.replies[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _embeddings_reply(resp: QueryResponse) -> bytes:
    """What a worker's POST /v1/embeddings answers for `resp` (stream/api/models.py)."""
    return json.dumps({"object": "list", "model": resp.model, "checkpoint": resp.checkpoint,
                       "data": [{"object": "embedding", "index": 0, "embedding": resp.vector.b64}],
                       "usage": {"prompt_tokens": 3, "total_tokens": 3},
                       "memory": {"conversation_id": resp.conversation_id, "tenant": None,
                                  "applied_seq": resp.applied_seq, "memory_len": resp.memory_len}}).encode()


def test_query_url() -> None:
    assert query_url("http://h:1") == "http://h:1/v1/embeddings"
    assert query_url("http://h:1/") == "http://h:1/v1/embeddings"
    assert query_url("h:1/v1/query") == "http://h:1/v1/embeddings"  # the older endpoint's URL
    assert query_url("h:1/v1/embeddings") == "http://h:1/v1/embeddings"


def test_query_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(QueryError, match="connection refused") as ei:
        query_worker(url, "c", "q", timeout=5)
    assert f"{url}/v1/embeddings" in str(ei.value) and ei.value.status is None
    with pytest.raises(QueryError, match="connection refused") as ei:
        asyncio.run(query_worker_async(url, "c", "q", timeout=5))
    assert f"{url}/v1/embeddings" in str(ei.value)


def test_query_http_errors_carry_status_and_server_body(stub_server: str) -> None:
    ok = QueryResponse(conversation_id="c", vector=encode_vector(np.ones(4, np.float32)), dim=4, memory_len=16,
                       applied_seq=0, checkpoint="ck", model="m")
    _Stub.replies = {
        "/v1/embeddings": (422, json.dumps({"error": "invalid request: input: bad", "error_type": "invalid_request"}
                                           ).encode()),
        "/a/v1/embeddings": (503, b'{"error": "checkpoint store unavailable; retry later", "error_type": "unavailable"}'),
        "/b/v1/embeddings": (500, b"Internal Server Error"),
        "/c/v1/embeddings": (200, b'{"not": "a response"}'),
        "/ok/v1/embeddings": (200, _embeddings_reply(ok)),
    }
    cases = [(stub_server, 422, "rejected the query (HTTP 422): invalid request: input: bad"),
             (stub_server + "/a", 503, "HTTP 503): checkpoint store unavailable; retry later"),
             (stub_server + "/b", 500, "failed to answer the query (HTTP 500): Internal Server Error"),
             (stub_server + "/c", 200, "not an embeddings response")]
    for url, status, text in cases:
        for call in (lambda: query_worker(url, "c", "q"), lambda: asyncio.run(query_worker_async(url, "c", "q"))):
            with pytest.raises(QueryError) as ei:
                call()
            assert text in str(ei.value) and url + "/v1/embeddings" in str(ei.value) and ei.value.status == status
    assert query_worker(stub_server + "/ok", "c", "q") == ok
    assert asyncio.run(query_worker_async(stub_server + "/ok", "c", "q")) == ok


# ---------------------------------------------------------------------------------------------
# IndexerConsumer on the real broker
# ---------------------------------------------------------------------------------------------
async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1)
    await prod.start()
    try:
        for key, value in records:
            await (await prod.send(topic, value, key=key))
    finally:
        await prod.stop()


def test_consumer_skips_bad_records_and_is_idempotent(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(2)
    good = [emb("a", s, [1.0, s, 0.0]) for s in range(3)] + [emb("b", 0, [0.0, 1.0, 0.0])]
    records = [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in good]
    records += [(b"a", b"{broken json"), (b"a", None), (b"a", b'{"type": "dead_letter"}'),
                (b"a", "\udcff".encode("utf-8", "surrogatepass")), (b"a", good[1].model_dump_json().encode()),
                (b"b", tomb("b", 0).model_dump_json().encode()), (b"a", b'{"type": "embedding", "seq": -1}')]
    asyncio.run(_produce(kafka_bootstrap, topic, records))

    async def run():
        async with IndexerConsumer(kafka_bootstrap, topic) as c:
            return await c.run_until_idle(idle_ms=800, max_wait_s=30), c.index

    stats, idx = asyncio.run(run())
    assert stats.records == len(records)
    assert stats.skipped == 5 and stats.embeddings == 5 and stats.deletes == 1
    assert idx.seqs("a") == [0, 1, 2] and "b" not in idx.conversations()
    assert idx.stats.replaced == 1


def test_consumer_run_forever_follows_the_topic(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(1)

    async def run():
        stop = asyncio.Event()
        seen: list = []
        async with IndexerConsumer(kafka_bootstrap, topic, on_event=seen.append) as c:
            task = asyncio.create_task(c.run_forever(stop, poll_ms=200))
            await _produce(kafka_bootstrap, topic, [(b"a", emb("a", 0, [1.0, 0.0]).model_dump_json().encode())])
            for _ in range(100):
                if len(c.index):
                    break
                await asyncio.sleep(0.1)
            await _produce(kafka_bootstrap, topic, [(b"a", tomb("a", 0).model_dump_json().encode())])
            for _ in range(100):
                if c.stats.deletes:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            stats = await asyncio.wait_for(task, 5)
            return stats, c.index, seen

    stats, idx, seen = asyncio.run(run())
    assert stats.embeddings == 1 and stats.deletes == 1 and len(idx) == 0
    assert [type(e).__name__ for e in seen] == ["EmbeddingEvent", "ConversationDeleted"]


def test_consumer_missing_topic_is_a_clear_error(kafka_bootstrap: str) -> None:
    with pytest.raises(TopicNotFound, match="does not exist"):
        asyncio.run(build_index(kafka_bootstrap, f"test.no-such-topic.{uuid.uuid4().hex[:8]}"))


def test_consumer_group_mode_resumes_from_committed_offsets(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(2)
    group = f"test-indexer-{uuid.uuid4().hex[:8]}"
    first = [emb("a", s, [1.0, s]) for s in range(3)]
    second = [emb("a", s, [1.0, s]) for s in range(3, 5)]
    enc = lambda evs: [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in evs]  # noqa: E731
    asyncio.run(_produce(kafka_bootstrap, topic, enc(first)))

    async def consume():
        # short group timings: tansu holds a JoinGroup for half the session timeout and does not
        # let the previous member leave early, so the second join waits for its session to expire
        async with IndexerConsumer(kafka_bootstrap, topic, group_id=group, session_timeout_ms=2000,
                                   heartbeat_interval_ms=500) as c:
            await c.run_until_idle(idle_ms=800, max_wait_s=30)
            return c.stats, c.index

    stats, idx = asyncio.run(consume())
    assert stats.embeddings == 3 and idx.seqs("a") == [0, 1, 2]
    asyncio.run(_produce(kafka_bootstrap, topic, enc(second)))
    stats, idx = asyncio.run(consume())
    assert stats.embeddings == 2 and idx.seqs("a") == [3, 4]  # only what was not committed yet


def test_search_end_to_end_with_a_stub_worker(kafka_bootstrap: str, topic_factory, stub_server: str) -> None:
    topic = topic_factory(2)
    q = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    resp = QueryResponse(conversation_id="c", vector=encode_vector(q), dim=4, memory_len=32, applied_seq=2,
                         checkpoint="ck", model="m")
    _Stub.replies = {"/v1/embeddings": (200, _embeddings_reply(resp))}
    evs = [emb("c", 0, [1, 0, 0, 0], checkpoint="ck"), emb("c", 1, [0, 1, 0, 0], checkpoint="ck"),
           emb("c", 2, [0, 1, 1, 0], checkpoint="ck"), emb("c", 3, [0, 1, 0, 0], checkpoint="older"),
           emb("d", 0, [0, 1, 0, 0], checkpoint="ck")]
    asyncio.run(_produce(kafka_bootstrap, topic, [(e.conversation_id.encode(), e.model_dump_json().encode())
                                                  for e in evs]))
    hits = asyncio.run(search_end_to_end(kafka_bootstrap, topic, stub_server, "c", "q", k=5,
                                         texts={("c", 1): "user: one"}, idle_ms=500))
    assert [h.seq for h in hits] == [1, 2, 0]  # seq 3 is from another checkpoint, "d" another conversation
    assert hits[0].text == "user: one" and hits[0].score == pytest.approx(1.0)


def test_search_end_to_end_fails_fast_and_clearly(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(1)
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(QueryError, match="connection refused"):
        asyncio.run(search_end_to_end(kafka_bootstrap, topic, url, "c", "q", idle_ms=10_000))
    assert time.monotonic() - t0 < 8  # the refused query cancels the indexing, no idle wait
    with pytest.raises((TopicNotFound, QueryError)):
        asyncio.run(search_end_to_end(kafka_bootstrap, f"test.no-such-topic.{uuid.uuid4().hex[:8]}", url, "c", "q"))


# ---------------------------------------------------------------------------------------------
# end to end with a real worker
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt() -> Path:
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    return cached_tiny_checkpoint("qwen3", "tiny")


def _conversations(n: int) -> list[dict]:
    lines = (REPO / "data" / "sample_conversations.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()][:n]


def test_search_end_to_end_matches_offline_engine(kafka_bootstrap: str, redis_url: str, topic_factory, tmp_path: Path,
                                                  tiny_ckpt: Path) -> None:
    from workers.engine import load_engine

    penv = PipelineEnv(kafka_bootstrap, redis_url, turns_topic=topic_factory(2), embeddings_topic=topic_factory(2),
                       dead_letter_topic=topic_factory(1), partitions=2, checkpoint=str(tiny_ckpt),
                       extra={"F_DATADIR": str(tmp_path / "faust-data")})
    convs = _conversations(3)
    events = list(turn_events(convs))
    texts = turn_texts(convs)
    worker = WorkerProc(penv, tmp_path).start()
    try:
        worker.wait_ready()
        asyncio.run(produce_records([(e.conversation_id.encode(), e.model_dump_json().encode()) for e in events],
                                    bootstrap=kafka_bootstrap, topic=penv.turns_topic, progress=False))

        def indexed():
            idx, _ = asyncio.run(build_index(kafka_bootstrap, penv.embeddings_topic, idle_ms=500))
            return idx if len(idx) == len(events) else None

        index = wait_for(indexed, timeout=120, interval=0.5, what=f"{len(events)} embeddings")

        # offline: the conversation stepped alone, then the query against its final memory
        engine = load_engine(tiny_ckpt)
        cid, question = "support-refund-0001", "how long does the refund take?"
        conv_turns = [e.to_turn_input() for e in events if e.conversation_id == cid]
        state = engine.new_state()
        outs = engine.step({cid: state}, conv_turns)
        for o in outs:  # the streamed vectors are the offline ones
            entry = index.get(cid, o.seq)
            assert entry is not None, (cid, o.seq)
            np.testing.assert_allclose(entry.vector, o.embedding, atol=1e-4)
        q = engine.embed_queries([(state, question)])[0]
        mat = np.stack([o.embedding for o in outs]).astype(np.float64)
        cos = mat @ q / (np.linalg.norm(mat, axis=1) * np.linalg.norm(q))
        offline = sorted(range(len(outs)), key=lambda i: (-cos[i], outs[i].seq))
        cos_by_seq = {o.seq: float(cos[i]) for i, o in enumerate(outs)}

        # the sample conversations carry a tenant: it is part of their identity (stream/identity.py)
        tenant = next(c.get("tenant") for c in convs if c["conversation_id"] == cid)
        resp = query_worker(worker.url, cid, question, tenant=tenant)
        assert resp.applied_seq == conv_turns[-1].seq and resp.memory_len == state.memory_len
        np.testing.assert_allclose(decode_vector(resp.vector), q, atol=1e-4)

        hits = asyncio.run(search_end_to_end(kafka_bootstrap, penv.embeddings_topic, worker.url, cid, question,
                                             k=len(outs), texts=texts, tenant=tenant))
        assert hits[0].seq == outs[offline[0]].seq
        assert [h.seq for h in hits] == [outs[i].seq for i in offline] or _near_ties(cos, offline)
        for h in hits:
            assert h.score == pytest.approx(cos_by_seq[h.seq], abs=1e-4)
            assert h.text == texts[(cid, h.seq)]
        assert len(asyncio.run(search_end_to_end(kafka_bootstrap, penv.embeddings_topic, worker.url, cid,
                                                 question, k=2, tenant=tenant))) == 2

        # delete: the tombstone reaches the topic and the conversation leaves the index
        delete = ConversationDelete(conversation_id=cid, seq=conv_turns[-1].seq, timestamp=datetime.now(timezone.utc),
                                    tenant=tenant)
        asyncio.run(produce_records([(cid.encode(), delete.model_dump_json().encode())], bootstrap=kafka_bootstrap,
                                    topic=penv.turns_topic, progress=False))

        def deleted():
            idx, stats = asyncio.run(build_index(kafka_bootstrap, penv.embeddings_topic, idle_ms=500))
            return (idx, stats) if stats.deletes else None

        idx, stats = wait_for(deleted, timeout=60, interval=0.5, what="conversation_deleted event")
        assert cid not in idx.conversations() and stats.skipped == 0
        others = {c["conversation_id"] for c in convs} - {cid}
        assert set(idx.conversations()) == others
        assert asyncio.run(search_end_to_end(kafka_bootstrap, penv.embeddings_topic, worker.url, cid,
                                             question, k=5, tenant=tenant)) == []
        with pytest.raises(QueryError) as gone:  # no memory any more: 404 unless memory-less is asked for
            query_worker(worker.url, cid, question, tenant=tenant)
        assert gone.value.status == 404
        after = query_worker(worker.url, cid, question, tenant=tenant, unknown_conversation="memoryless")
        assert after.applied_seq == -1 and after.memory_len == 0
    finally:
        worker.stop()
    assert worker.proc.returncode is not None


def _near_ties(cos: np.ndarray, order: list[int]) -> bool:
    """True if some neighbours in the offline ranking are within float noise of each other
    (then their order may legitimately flip between batched and unbatched runs)."""
    s = [cos[i] for i in order]
    return any(abs(a - b) < 1e-4 for a, b in zip(s, s[1:]))
