"""The PostgreSQL + pgvector sink (issue #19): rows/s against the topic's rate, search latency
at 100k rows, recall@10 of the HNSW index against an exact scan.

    python -m benchmarks.bench_sink [--dim 1024] [--rows 100000] [--rates 250,500,1000]
                                    [--phase-records 3000] [--queries 200] [--ef 40,100,200]

Everything runs on this machine: the local broker (tansu), the bundled PostgreSQL 18 +
pgvector 0.8.2 (devtools/postgres.py) and a real `evostream sink` subprocess. Vectors are
synthetic and CLUSTERED (unit vectors around 2,000 random centres, like embeddings of many
conversations on fewer topics): recall depends on the data, so it is measured on these, not
claimed for real ones. The results go to benchmarks/results/sink.json, the figures of
BENCHMARKS.md ("Vector sink") are rendered from it (python -m benchmarks.figures render).

1. Throughput: per offered rate, a producer writes `--phase-records` embedding events at that
   rate to a fresh 4-partition topic while the sink indexes it; then a backlog phase (all
   records first, then the sink). Reported: the rate achieved, the sink's committed rows/s
   over the phase, the largest lag seen (records produced, not yet committed), and how long
   after the last record the table was complete.
2. Search: `--rows` rows of one tenant (500 conversations), loaded through the index's own
   upsert, the HNSW index built after the load; `--queries` tenant-wide searches (k=10) per
   ef_search through the HNSW index and as an exact scan (the reference of recall@10), and
   per-conversation searches (the default scope of `evostream search`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from benchmarks.results_schema import RESULTS_DIR, RunInfo, write_json

SINK_FILE = "sink.json"
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


class ThroughputPhase(BaseModel):
    label: str
    offered_per_s: float            # 0: backlog (everything produced before the sink starts)
    records: int
    produced_per_s: float
    sink_rows_per_s: float
    max_lag_records: int
    complete_after_last_s: float


class EfPoint(BaseModel):
    ef_search: int
    recall_at_10: float
    p50_ms: float
    p99_ms: float


class SearchResults(BaseModel):
    rows: int
    conversations: int
    load_rows_per_s: float
    hnsw_build_s: float
    hnsw_used: bool                 # EXPLAIN of a tenant-wide search names the HNSW index
    exact_p50_ms: float
    exact_p99_ms: float
    conversation_p50_ms: float
    conversation_p99_ms: float
    hnsw: list[EfPoint]
    default_ef_search: int
    default: EfPoint


class SinkBench(BaseModel):
    run: RunInfo
    cpu: str
    dim: int
    batch_max: int
    postgres: str
    pgvector: str
    shared_buffers: str
    throughput: list[ThroughputPhase]
    search: SearchResults | None = None


def cpu_model() -> str:
    """The host's CPU model, as every results file names it (workers/precision.py)."""
    from workers.precision import cpu_facts

    return f"{cpu_facts().model}, {os.cpu_count()} CPUs"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    c = centres[rng.integers(0, len(centres), n)]
    v = c + rng.standard_normal((n, dim)).astype(np.float32) * (0.6 / np.sqrt(dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def event_bytes(cid: str, seq: int, vec: np.ndarray, tenant: str = "bench") -> bytes:
    from schemas.events import EmbeddingEvent, SourceRef, StageTimings
    from schemas.vectors import encode_vector

    return EmbeddingEvent(conversation_id=cid, seq=seq, vector=encode_vector(vec), dim=vec.shape[0], model="m",
                          checkpoint="ck", memory_len=seq, memory="new" if seq == 0 else "continued", tenant=tenant,
                          source=SourceRef(topic="turns", partition=0, offset=seq),
                          timings=StageTimings(queue_ms=0, step_ms=0, checkpoint_ms=0),
                          produced_at=T0 + timedelta(seconds=seq)).model_dump_json().encode()


# --------------------------------------------------------------------------- 1. throughput


class SinkProc:
    """`evostream sink` as a subprocess (what users run)."""

    def __init__(self, env: dict[str, str], log: Path):
        import subprocess
        import sys

        full = {k: v for k, v in os.environ.items() if not k.startswith("EVOSTREAM_")}
        full.update(env, PYTHONUNBUFFERED="1")
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "sink"], env=full, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=Path(__file__).resolve().parents[1])

    def start(self) -> "SinkProc":
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        import signal
        import subprocess

        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def committed(conn, schema: str, topic: str) -> int:
    import psycopg

    try:
        row = conn.execute(f'SELECT coalesce(sum(next_offset), 0) FROM "{schema}".evostream_offsets '
                           "WHERE topic = %s", (topic,)).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0])


async def produce_paced(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], rate: float,
                        sent: list[int]) -> float:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 << 20)
    await p.start()
    t0 = time.monotonic()
    try:
        chunk = 50
        for i in range(0, len(records), chunk):
            futs = [await p.send(topic, v, key=k) for k, v in records[i:i + chunk]]
            for f in futs:
                await f
            sent[0] = min(len(records), i + chunk)
            if rate > 0:
                delay = t0 + sent[0] / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    finally:
        await p.stop()
    return time.monotonic() - t0


def throughput_phase(label: str, rate: float, n: int, dim: int, batch_max: int, stack, dsn: str, rng,
                     centres, tmp: Path) -> ThroughputPhase:
    import threading

    import psycopg

    from stream.kafka.topics import ensure_topics_sync

    topic = f"bench.sink.{label}.{rng.integers(1 << 30)}"
    schema = f"bench_{label}".replace("-", "_")
    ensure_topics_sync(stack.kafka_bootstrap, {topic: 4})
    vecs = clustered(n, dim, rng, centres)
    convs = 200
    records = [(f"c{i % convs}".encode(), event_bytes(f"c{i % convs}", i // convs, vecs[i])) for i in range(n)]
    env = {"EVOSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "EVOSTREAM_EMBEDDINGS_TOPIC": topic,
           "EVOSTREAM_SINK_TEXTS": "false", "EVOSTREAM_SINK_DSN": dsn, "EVOSTREAM_SINK_SCHEMA": schema,
           "EVOSTREAM_SINK_BATCH_MAX": str(batch_max)}
    sent = [0]
    max_lag = 0
    mon = psycopg.connect(dsn, autocommit=True)
    sink = None
    try:
        if rate > 0:
            sink = SinkProc(env, tmp / f"sink-{label}.log").start()
            time.sleep(3.0)  # the sink's start-up (imports, connect) is not what is measured
        prod: dict = {}
        th = threading.Thread(target=lambda: prod.__setitem__("s", asyncio.run(
            produce_paced(stack.kafka_bootstrap, topic, records, rate, sent))))
        t_start = time.monotonic()
        th.start()
        if rate == 0:
            th.join()
            t_start = time.monotonic()
            sink = SinkProc(env, tmp / f"sink-{label}.log").start()
        first_commit = None
        while True:
            done = committed(mon, schema, topic)
            if done and first_commit is None:
                first_commit = (time.monotonic(), done)
            max_lag = max(max_lag, sent[0] - done)
            if done >= n and not th.is_alive():
                break
            if not sink.alive():
                raise RuntimeError(f"sink exited:\n{sink.tail()}")
            time.sleep(0.1)
        t_end = time.monotonic()
        th.join()
        produce_s = prod["s"]
        last_sent_at = t_start + produce_s if rate > 0 else t_start
        if rate == 0 and first_commit is not None:  # the sink's own rate, not its start-up
            t0, n0 = first_commit
            rows_per_s = (n - n0) / max(1e-9, t_end - t0)
        else:
            rows_per_s = n / max(1e-9, t_end - t_start)
        return ThroughputPhase(label=label, offered_per_s=rate, records=n, produced_per_s=round(n / produce_s, 1),
                               sink_rows_per_s=round(rows_per_s, 1), max_lag_records=int(max_lag),
                               complete_after_last_s=round(max(0.0, t_end - last_sent_at), 2))
    finally:
        if sink is not None:
            sink.stop()
        mon.close()


# --------------------------------------------------------------------------- 2. search


def search_bench(rows: int, dim: int, queries: int, efs: list[int], default_ef: int, dsn: str, rng,
                 centres) -> SearchResults:
    from stream.index.base import SearchQuery
    from stream.index.ops import TurnRow, Upsert, plan
    from stream.index.pgvector import PgVectorIndex

    convs = 500
    schema = "bench_search"
    idx = PgVectorIndex(dsn, schema=schema, ef_search=default_ef)
    try:
        idx.conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        idx.conn.commit()
        idx.close()
        idx = PgVectorIndex(dsn, schema=schema, ef_search=default_ef)
        t0 = time.perf_counter()
        chunk = 5000
        for start in range(0, rows, chunk):
            vecs = clustered(min(chunk, rows - start), dim, rng, centres)
            ops = []
            for j, v in enumerate(vecs):
                i = start + j
                r = TurnRow("bench", f"c{i % convs}", 1, i // convs, f"{i:032x}"[:8] + "-0000-5000-8000-000000000000",
                            "continued", "ck", "m", 0, v, T0, T0 + timedelta(seconds=i), 0, i)
                ops.append(("emb", 0, i, Upsert(r)))
            with idx.transaction():
                if idx.dim is None:
                    idx._create_turns(dim)
                    idx.conn.execute(f'DROP INDEX "{schema}".evostream_turns_hnsw')
                idx.execute("bench", plan(ops, {}))
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        with idx.transaction():
            idx.conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
            idx.conn.execute(f'CREATE INDEX evostream_turns_hnsw ON "{schema}".evostream_turns '
                             "USING hnsw (embedding vector_cosine_ops)")
        build = time.perf_counter() - t0
        with idx.transaction():
            idx.conn.execute(f'ANALYZE "{schema}".evostream_turns')
        qs = clustered(queries, dim, rng, centres)
        idx.ef_search = max(efs)   # an untimed pass of other queries first: a serving server is warm
        for q in clustered(50, dim, rng, centres):
            idx.search(SearchQuery(vector=q, checkpoint="ck", tenant="bench", k=10))
        plan_text = idx.explain(SearchQuery(vector=qs[0], checkpoint="ck", tenant="bench", k=10))
        hnsw_used = "evostream_turns_hnsw" in plan_text
        print(f"  tenant-wide plan uses the HNSW index: {hnsw_used}", flush=True)
        exact_lat, exact_ids = [], []
        for q in qs:
            t = time.perf_counter()
            hits = idx.search(SearchQuery(vector=q, checkpoint="ck", tenant="bench", k=10, exact=True))
            exact_lat.append(time.perf_counter() - t)
            exact_ids.append({(h.conversation_id, h.seq) for h in hits})
        conv_lat = []
        for i, q in enumerate(qs):
            t = time.perf_counter()
            idx.search(SearchQuery(vector=q, checkpoint="ck", tenant="bench", conversation_id=f"c{i % convs}", k=10))
            conv_lat.append(time.perf_counter() - t)
        points = []
        for ef in sorted(set(efs) | {default_ef}):
            idx.ef_search = ef
            lat, rec = [], []
            for q, want in zip(qs, exact_ids):
                t = time.perf_counter()
                hits = idx.search(SearchQuery(vector=q, checkpoint="ck", tenant="bench", k=10))
                lat.append(time.perf_counter() - t)
                rec.append(len({(h.conversation_id, h.seq) for h in hits} & want) / 10)
            points.append(EfPoint(ef_search=ef, recall_at_10=round(float(np.mean(rec)), 4),
                                  p50_ms=round(pct(lat, 50), 2), p99_ms=round(pct(lat, 99), 2)))
            print(f"  ef_search {ef}: recall@10 {points[-1].recall_at_10:.3f}, p50 {points[-1].p50_ms} ms, "
                  f"p99 {points[-1].p99_ms} ms", flush=True)
        return SearchResults(rows=rows, conversations=convs, load_rows_per_s=round(rows / load, 1),
                             hnsw_build_s=round(build, 1), hnsw_used=hnsw_used, exact_p50_ms=round(pct(exact_lat, 50), 2),
                             exact_p99_ms=round(pct(exact_lat, 99), 2), conversation_p50_ms=round(pct(conv_lat, 50), 2),
                             conversation_p99_ms=round(pct(conv_lat, 99), 2), hnsw=points, default_ef_search=default_ef,
                             default=next(p for p in points if p.ef_search == default_ef))
    finally:
        idx.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rates", default="250,500,1000")
    ap.add_argument("--phase-records", type=int, default=3000)
    ap.add_argument("--batch-max", type=int, default=500)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", default="40,100,200")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--shared-buffers", default="2GB", help="shared_buffers of the bundled server")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / SINK_FILE)
    args = ap.parse_args(argv)
    from stream.settings import Settings

    from devtools.localstack import LocalStack
    from devtools.postgres import EmbeddedPostgres

    rng = np.random.default_rng(19)
    centres = rng.standard_normal((2000, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    command = "python -m benchmarks.bench_sink " + " ".join(argv if argv is not None else os.sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pg = EmbeddedPostgres(tmp / "pg").start()
        try:
            # the bundled server's default shared_buffers (128 MB) holds a fraction of a 100k x
            # 1024-d HNSW graph; a server for this table would be given more
            with pg.connect() as c:
                c.execute(f"ALTER SYSTEM SET shared_buffers = '{args.shared_buffers}'")
            pg.stop()
            pg = EmbeddedPostgres(tmp / "pg").start()
            with pg.connect() as c:
                shared_buffers = c.execute("SHOW shared_buffers").fetchone()[0]
                versions = (c.execute("SHOW server_version").fetchone()[0],
                            c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0])
            phases = []
            with LocalStack(tmp / "stack", with_redis=False) as stack:
                for rate in [float(r) for r in args.rates.split(",") if r] + [0.0]:
                    label = f"rate-{int(rate)}" if rate else "backlog"
                    ph = throughput_phase(label, rate, args.phase_records, args.dim, args.batch_max, stack, pg.dsn(),
                                          rng, centres, tmp)
                    print(ph.model_dump_json(), flush=True)
                    phases.append(ph)
            search = None
            if not args.skip_search:
                search = search_bench(args.rows, args.dim, args.queries, [int(e) for e in args.ef.split(",")],
                                      Settings.model_fields["sink_hnsw_ef_search"].default, pg.dsn(), rng, centres)
                print(search.model_dump_json(), flush=True)
        finally:
            pg.stop()
    res = SinkBench(run=RunInfo.now(command.strip()), cpu=cpu_model(), dim=args.dim, batch_max=args.batch_max,
                    postgres=versions[0], pgvector=versions[1], shared_buffers=shared_buffers, throughput=phases,
                    search=search)
    write_json(res, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
