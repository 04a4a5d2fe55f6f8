"""Reference index: fill and search latency at 10k indexed turns, the SQLite + numpy index
(stream/index/reference_index.py) against qdrant-client's embedded (local, on-disk) mode.

    python -m benchmarks.bench_index [--turns 10000] [--convs 200] [--dim 1024] [--no-qdrant] [--no-broker]

Both hold the same vectors (unit length, float32) with (tenant, conversation) scoping; a search
is "the k=5 best turns of one conversation". Timings are wall clock on this machine (shared
cores), per search: p50/p95 over 50 searches of random conversations; reopen = opening the
on-disk index again (what every `evostream search` does).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from schemas.events import EmbeddingEvent, SourceRef, StageTimings
from schemas.vectors import encode_vector
from stream.index.reference_index import ReferenceIndex

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000


def bench_sqlite(vecs: np.ndarray, convs: int, d: Path, queries: np.ndarray, picks: list[int]) -> dict:
    n = len(vecs)
    recs = [(0, i, EmbeddingEvent(conversation_id=f"c{i % convs}", seq=i // convs, vector=encode_vector(vecs[i]),
                                  dim=vecs.shape[1], model="m", checkpoint="ck", memory_len=0, tenant="t",
                                  source=SourceRef(topic="turns", partition=0, offset=i),
                                  timings=StageTimings(queue_ms=0, step_ms=0, checkpoint_ms=0),
                                  produced_at=NOW).model_dump_json().encode()) for i in range(n)]
    t0 = time.perf_counter()
    with ReferenceIndex(d / "idx.sqlite") as idx:
        for i in range(0, n, 2000):
            idx.apply_embeddings("emb", recs[i:i + 2000])
    fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = ReferenceIndex(d / "idx.sqlite")
    reopen = time.perf_counter() - t0
    lat = []
    for q, c in zip(queries, picks):
        t = time.perf_counter()
        hits = idx.search("t", f"c{c}", q, 5)
        lat.append(time.perf_counter() - t)
        assert len(hits) == 5
    idx.close()
    return {"store": "sqlite+numpy", "fill_turns_per_s": round(n / fill), "reopen_ms": round(reopen * 1000, 1),
            "search_p50_ms": round(_pct(lat, 0.5), 2), "search_p95_ms": round(_pct(lat, 0.95), 2)}


def bench_qdrant(vecs: np.ndarray, convs: int, d: Path, queries: np.ndarray, picks: list[int]) -> dict:
    from qdrant_client import QdrantClient, models

    n, dim = vecs.shape
    c = QdrantClient(path=str(d / "qdrant"))
    c.create_collection("t", vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
    t0 = time.perf_counter()
    for i in range(0, n, 500):
        c.upsert("t", points=[models.PointStruct(
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"t/c{j % convs}/{j // convs}")), vector=vecs[j].tolist(),
            payload={"tenant": "t", "conversation_id": f"c{j % convs}", "seq": j // convs})
            for j in range(i, min(n, i + 500))])
    fill = time.perf_counter() - t0
    c.close()
    t0 = time.perf_counter()
    c = QdrantClient(path=str(d / "qdrant"))
    reopen = time.perf_counter() - t0
    lat = []
    for q, conv in zip(queries, picks):
        flt = models.Filter(must=[models.FieldCondition(key="tenant", match=models.MatchValue(value="t")),
                                  models.FieldCondition(key="conversation_id",
                                                        match=models.MatchValue(value=f"c{conv}"))])
        t = time.perf_counter()
        hits = c.query_points("t", query=q.tolist(), query_filter=flt, limit=5).points
        lat.append(time.perf_counter() - t)
        assert len(hits) == 5
    c.close()
    return {"store": "qdrant local", "fill_turns_per_s": round(n / fill), "reopen_ms": round(reopen * 1000, 1),
            "search_p50_ms": round(_pct(lat, 0.5), 2), "search_p95_ms": round(_pct(lat, 0.95), 2)}


def bench_catch_up(vecs: np.ndarray, convs: int, d: Path) -> dict:
    """`evostream search`'s index step against a real (local) broker: the first catch-up reads
    all 10k embedding events, the next one (nothing new) only checks the offsets."""
    import asyncio

    from devtools.localstack import LocalStack
    from stream.clients.producer import produce_records
    from stream.index.reference_index import catch_up
    from stream.kafka.topics import ensure_topics_sync

    n = len(vecs)
    with LocalStack(d / "stack") as stack:
        ensure_topics_sync(stack.kafka_bootstrap, {"bench.emb": 8})
        recs = [(f"c{i % convs}".encode(), EmbeddingEvent(
            conversation_id=f"c{i % convs}", seq=i // convs, vector=encode_vector(vecs[i]), dim=vecs.shape[1],
            model="m", checkpoint="ck", memory_len=0, tenant="t", source=SourceRef(topic="turns", partition=0, offset=i),
            timings=StageTimings(queue_ms=0, step_ms=0, checkpoint_ms=0), produced_at=NOW).model_dump_json().encode())
            for i in range(n)]
        asyncio.run(produce_records(recs, bootstrap=stack.kafka_bootstrap, topic="bench.emb", progress=False))
        with ReferenceIndex(d / "catchup.sqlite") as idx:
            first = asyncio.run(catch_up(idx, stack.kafka_bootstrap, "bench.emb", None))
            again = asyncio.run(catch_up(idx, stack.kafka_bootstrap, "bench.emb", None))
            assert first.embeddings.embeddings == n and again.embeddings.embeddings == 0
    return {"store": "sqlite+numpy, catch-up from the local broker", "first_catch_up_s": round(first.seconds, 2),
            "next_catch_up_s": round(again.seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=10_000)
    ap.add_argument("--convs", type=int, default=200)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--searches", type=int, default=50)
    ap.add_argument("--no-qdrant", action="store_true")
    ap.add_argument("--no-broker", action="store_true", help="skip the catch-up from a local broker")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.turns, args.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = rng.standard_normal((args.searches, args.dim)).astype(np.float32)
    picks = [int(x) for x in rng.integers(0, args.convs, args.searches)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        out.append(bench_sqlite(vecs, args.convs, Path(tmp), queries, picks))
        if not args.no_qdrant:
            out.append(bench_qdrant(vecs, args.convs, Path(tmp), queries, picks))
        if not args.no_broker:
            out.append(bench_catch_up(vecs, args.convs, Path(tmp)))
    for r in out:
        print(json.dumps({"turns": args.turns, "conversations": args.convs, "dim": args.dim, **r}))


if __name__ == "__main__":
    main()
