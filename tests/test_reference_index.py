"""The persistent reference index (issue #11, stream/index/reference_index.py): scoped by tenant and
conversation, idempotent, tombstones, texts from the turns topic, offsets stored with the rows
so that a restart resumes where it stopped (real broker), and `evostream search` printing the
turn text against a real worker."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from schemas.events import ConversationDeleted, EmbeddingEvent, SourceRef, StageTimings, TurnEvent
from schemas.vectors import encode_vector
from stream.clients.producer import produce_records
from stream.index.reference_index import ReferenceIndex, catch_up
from tests.support.workers import PipelineEnv, WorkerProc, read_topic_sync, wait_for

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def emb(cid: str, seq: int, vec, *, tenant: str | None = None, checkpoint: str = "ck") -> bytes:
    v = np.asarray(vec, dtype=np.float32)
    return EmbeddingEvent(conversation_id=cid, seq=seq, vector=encode_vector(v), dim=v.shape[0], model="m",
                          checkpoint=checkpoint, memory_len=0, tenant=tenant,
                          source=SourceRef(topic="turns", partition=0, offset=seq),
                          timings=StageTimings(queue_ms=0, step_ms=0, checkpoint_ms=0),
                          produced_at=NOW).model_dump_json().encode()


def tomb(cid: str, tenant: str | None = None) -> bytes:
    return ConversationDeleted(conversation_id=cid, deleted_through_seq=None, at=NOW,
                               tenant=tenant).model_dump_json().encode()


def turn(cid: str, seq: int, text: str, tenant: str | None = None) -> tuple[bytes, bytes]:
    return cid.encode(), TurnEvent(conversation_id=cid, seq=seq, timestamp=NOW, tenant=tenant,
                                   messages=[{"role": "user", "content": text}]).model_dump_json().encode()


def test_tenant_scope_idempotence_tombstones_texts(tmp_path: Path) -> None:
    with ReferenceIndex(tmp_path / "i.sqlite") as idx:
        st = idx.apply_embeddings("emb", [(0, 0, emb("c", 0, [1, 0, 0], tenant="a")),
                                          (0, 1, emb("c", 1, [0, 1, 0], tenant="a")),
                                          (0, 2, emb("c", 0, [0, 0, 1], tenant="b")),  # same id, other tenant
                                          (0, 3, emb("c", 1, [0, 1, 0], tenant="a")),  # duplicate
                                          (0, 4, b"{not json"),
                                          (1, 0, emb("c", 0, [1, 1, 0]))])             # default tenant
        assert (st.embeddings, st.skipped) == (5, 1)
        assert idx.count() == 4 and idx.seqs("a", "c") == [0, 1] and idx.seqs("b", "c") == [0]
        assert idx.offsets("emb") == {0: 5, 1: 1}
        idx.apply_turns("turns", [(0, 0, *turn("c", 0, "refund order 17", tenant="a")),
                                  (0, 1, b"c", json.dumps({"type": "turn", "conversation_id": "other", "seq": 5,
                                                           "messages": [{"role": "user", "content": "x"}]}).encode())])
        hits = idx.search("a", "c", np.array([1, 0.1, 0], np.float32), k=5)
        assert [h.seq for h in hits] == [0, 1]
        assert hits[0].text == "user: refund order 17" and hits[1].text is None
        assert [h.seq for h in idx.search("b", "c", np.array([0, 0, 1], np.float32), k=5)] == [0]
        assert idx.search("b", "c", np.array([0, 0, 1], np.float32), k=5, checkpoint="other") == []
        assert idx.text("other", "c", 5) is None and idx.text(None, "other", 5) is None  # key mismatch: not stored
        # a tombstone drops only that tenant's conversation; what follows is its next life
        idx.apply_embeddings("emb", [(0, 5, tomb("c", tenant="a")), (0, 6, emb("c", 0, [0, 0, 1], tenant="a"))])
        assert idx.seqs("a", "c") == [0] and idx.seqs("b", "c") == [0] and idx.seqs(None, "c") == [0]
        assert idx.search("a", "c", np.array([0, 0, 1], np.float32), k=1)[0].score == pytest.approx(1.0)
        idx.apply_turns("turns", [(0, 2, b"c", json.dumps({"type": "delete", "conversation_id": "c", "tenant": "a",
                                                           "timestamp": NOW.isoformat()}).encode())])
        assert idx.text("a", "c", 0) is None


def test_restart_resumes_from_stored_offsets(tmp_path: Path, kafka_bootstrap: str, topic_factory) -> None:
    emb_topic, turns_topic = topic_factory(2), topic_factory(2)

    def produce(records: list[tuple[bytes, bytes]], topic: str) -> None:
        asyncio.run(produce_records(records, bootstrap=kafka_bootstrap, topic=topic, progress=False))

    produce([(f"c{i}".encode(), emb(f"c{i}", s, [1, s, i])) for i in range(6) for s in range(3)], emb_topic)
    produce([turn(f"c{i}", s, f"turn {s} of c{i}") for i in range(6) for s in range(3)], turns_topic)
    path = tmp_path / "idx.sqlite"
    with ReferenceIndex(path) as idx:
        c = asyncio.run(catch_up(idx, kafka_bootstrap, emb_topic, turns_topic))
        assert (c.embeddings.embeddings, c.texts.texts) == (18, 18)
        assert sum(idx.offsets(emb_topic).values()) == 18
    # a restart: nothing is read again ...
    with ReferenceIndex(path) as idx:
        c = asyncio.run(catch_up(idx, kafka_bootstrap, emb_topic, turns_topic))
        assert (c.embeddings.embeddings, c.texts.texts) == (0, 0)
        assert idx.count() == 18
    # ... and only what is new is read after it
    produce([(b"c0", tomb("c0")), (b"c9", emb("c9", 0, [0, 1, 0]))], emb_topic)
    produce([turn("c9", 0, "a new conversation")], turns_topic)
    with ReferenceIndex(path) as idx:
        c = asyncio.run(catch_up(idx, kafka_bootstrap, emb_topic, turns_topic))
        assert (c.embeddings.embeddings, c.embeddings.deletes, c.texts.texts) == (1, 1, 1)
        assert idx.count() == 18 - 3 + 1
        hit = idx.search(None, "c9", np.array([0, 1, 0], np.float32), k=1)[0]
        assert hit.seq == 0 and hit.text == "user: a new conversation"


def test_search_command_prints_turn_text(kafka_bootstrap: str, redis_url: str, topic_factory,
                                         tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    penv = PipelineEnv(kafka_bootstrap, redis_url, topic_factory(2), topic_factory(2), topic_factory(1), 2)
    env = {k: v for k, v in penv.env().items() if k.startswith("EVOSTREAM_")}
    env["EVOSTREAM_INDEX_PATH"] = str(tmp_path / "index.sqlite")
    worker = WorkerProc(penv, tmp_path, "ix").start()
    try:
        texts = ["my order 17 arrived broken", "I want a refund please", "also my password does not work"]
        asyncio.run(produce_records([turn("ix-c1", s, t, tenant="acme") for s, t in enumerate(texts)],
                                    bootstrap=kafka_bootstrap, topic=penv.turns_topic, progress=False))
        worker.wait_ready(timeout=180)
        wait_for(lambda: len(read_topic_sync(kafka_bootstrap, penv.embeddings_topic, idle_ms=800)) >= 3,
                 timeout=120, interval=2, what="3 embeddings")
        p = run_cli("search", "--conversation", "ix-c1", "--tenant", "acme", "--text", "refund", "-k", "3",
                    "--url", worker.url, **env)
        assert p.returncode == 0, p.stderr
        hits = json.loads(p.stdout)
        assert sorted(h["seq"] for h in hits) == [0, 1, 2]
        assert {h["seq"]: h["text"] for h in hits} == {s: f"user: {t}" for s, t in enumerate(texts)}
        assert "3 new embeddings" in p.stderr
        p = run_cli("search", "--conversation", "ix-c1", "--tenant", "acme", "--text", "refund", "-k", "1",
                    "--url", worker.url, **env)
        assert p.returncode == 0 and "0 new embeddings" in p.stderr, p.stderr  # the index persisted
    finally:
        worker.stop()


def test_recreated_topic_is_read_again(tmp_path: Path, kafka_bootstrap: str, topic_factory) -> None:
    """A topic deleted and created again under the same name (a local stack restart) must not
    be resumed at the old offsets: its old rows go, its new records are read from 0."""
    from stream.kafka.topics import delete_topics_sync, ensure_topics_sync

    emb_topic = topic_factory(1)
    asyncio.run(produce_records([(b"old", emb("old", s, [1, s, 0])) for s in range(5)], bootstrap=kafka_bootstrap,
                                topic=emb_topic, progress=False))
    with ReferenceIndex(tmp_path / "idx.sqlite") as idx:
        asyncio.run(catch_up(idx, kafka_bootstrap, emb_topic, None))
        assert idx.seqs(None, "old") == [0, 1, 2, 3, 4]
        delete_topics_sync(kafka_bootstrap, [emb_topic])
        ensure_topics_sync(kafka_bootstrap, {emb_topic: 1})
        asyncio.run(produce_records([(b"new", emb("new", s, [0, 1, s])) for s in range(7)],
                                    bootstrap=kafka_bootstrap, topic=emb_topic, progress=False))
        c = asyncio.run(catch_up(idx, kafka_bootstrap, emb_topic, None))
        assert idx.seqs(None, "old") == [] and idx.seqs(None, "new") == list(range(7)), c
