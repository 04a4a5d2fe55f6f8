"""Query API benchmark: query latency at a stated rate, and ingestion with and without a
bounded query flood, on the local stack (one worker, CPU, tiny checkpoint); run once per
`--query-cache` configuration (issue #22: the query-ready memory off, then on), one worker each.

Phases, all against ONE worker (so every phase sees the same warm process):
1. memory: a few conversations are ingested so that queries read real memories;
2. latency: open-loop `POST /v1/embeddings` (one query, a conversation's memory) at `--qps`
   for `--seconds`, ingestion idle: p50/p99 of the request latency seen by the client;
3. baseline: a backlog of turns is produced up front; ingestion turns/s = turns / (time from
   the start of producing to the last turn applied, from the worker's own counter);
4. flood: the same shape of backlog (other conversations) while `--flood` closed-loop
   clients keep sending `POST /v1/embeddings` (4 queries each, against memories) until it
   is drained;
5. baseline again (the mean of 3 and 5 is the baseline, which evens out drift on a shared
   machine).

Run:  .venv/bin/python -m benchmarks.bench_query  [--qps 20 --seconds 15 --flood 8 --query-cache off,auto]
Writes benchmarks/results/query_api.json and the "Query API (issue 9)" section of BENCHMARKS.md
(figures as markers rendered from that file).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.workers import PipelineEnv, WorkerProc  # noqa: E402

from benchmarks.bench_e2e import conversations  # noqa: E402
from benchmarks.figures import marker  # noqa: E402
from benchmarks.report import update_section  # noqa: E402
from benchmarks.results_schema import (QUERY_API_FILE, RESULTS_DIR, QueryApiResults, QueryApiRun, RunInfo,  # noqa: E402
                                       write_json)
from devtools.localstack import LocalStack  # noqa: E402
from stream.clients.producer import produce_records, turn_events  # noqa: E402
from stream.kafka.topics import ensure_topics_sync  # noqa: E402

APPLIED = "evostream_turns_applied_total"
QUESTIONS = ["where is my parcel?", "refund for the invoice", "reset my password", "which flight and seat?"]


async def applied(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(APPLIED + " "):
            return float(line.split()[1])
    return 0.0


async def ingest(session: aiohttp.ClientSession, url: str, bootstrap: str, topic: str, convs: list[dict],
                 timeout: float = 900) -> tuple[int, float]:
    """Produce the conversations as a backlog; (turns, seconds until the worker applied all)."""
    records = [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in turn_events(convs)]
    start = await applied(session, url)
    t0 = time.perf_counter()
    await produce_records(records, bootstrap=bootstrap, topic=topic, rate=0.0, progress=False)
    deadline = t0 + timeout
    while await applied(session, url) < start + len(records):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"backlog of {len(records)} turns not applied within {timeout}s")
        await asyncio.sleep(0.05)
    return len(records), time.perf_counter() - t0


async def one_query(session: aiohttp.ClientSession, url: str, cid: str, texts: list[str]) -> tuple[int, float]:
    body = {"model": "evoembedding", "input": texts, "encoding_format": "base64", "conversation_id": cid}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/embeddings", json=body) as r:
        await r.read()
        return r.status, time.perf_counter() - t0


async def latency_phase(session: aiohttp.ClientSession, url: str, cids: list[str], qps: float,
                        seconds: float) -> dict:
    """Open loop: request i is sent at t0 + i/qps whatever the previous ones are doing."""
    n = int(qps * seconds)
    t0 = time.perf_counter()

    async def fire(i: int) -> tuple[int, float]:
        await asyncio.sleep(max(0.0, t0 + i / qps - time.perf_counter()))
        return await one_query(session, url, cids[i % len(cids)], [QUESTIONS[i % len(QUESTIONS)]])

    res = await asyncio.gather(*(fire(i) for i in range(n)))
    lat = np.array([s for code, s in res if code == 200]) * 1000
    return dict(n=n, ok=len(lat), p50=float(np.percentile(lat, 50)), p99=float(np.percentile(lat, 99)),
                codes=sorted({code for code, _ in res}))


async def flood_phase(session: aiohttp.ClientSession, url: str, bootstrap: str, topic: str, convs: list[dict],
                      cids: list[str], clients: int) -> dict:
    stop = asyncio.Event()
    lat: list[float] = []
    codes: dict[int, int] = {}

    async def client(k: int) -> None:
        i = k
        while not stop.is_set():
            code, s = await one_query(session, url, cids[i % len(cids)], QUESTIONS)
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append(s * 1000)
            i += clients

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(1.0)  # the flood is on before the backlog arrives
    t_flood = time.perf_counter()
    try:
        turns, secs = await ingest(session, url, bootstrap, topic, convs)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t_flood
    arr = np.array(lat)
    return dict(turns=turns, seconds=secs, answered=codes.get(200, 0), codes=codes, qps=codes.get(200, 0) / wall,
                p50=float(np.percentile(arr, 50)), p99=float(np.percentile(arr, 99)))


async def run(a: argparse.Namespace, stack: LocalStack, ckpt: str, log_dir: Path, query_cache: str) -> dict:
    tag = f"q{int(time.time())}{query_cache}"
    topics = {f"bench.{tag}.turns": a.partitions, f"bench.{tag}.emb": a.partitions, f"bench.{tag}.dlq": 1}
    ensure_topics_sync(stack.kafka_bootstrap, topics)
    t_turns, t_emb, t_dlq = list(topics)
    penv = PipelineEnv(stack.kafka_bootstrap, stack.redis_url, t_turns, t_emb, t_dlq, a.partitions, checkpoint=ckpt,
                       extra={"EVOSTREAM_QUERY_CACHE_MAX_BYTES": query_cache})
    w = WorkerProc(penv, log_dir, name=f"query-bench-{query_cache}").start()
    try:
        w.wait_ready(180)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            memory = conversations(8, 8, seed=100)
            for c in memory:
                c["conversation_id"] = "mem-" + c["conversation_id"]
            await ingest(session, w.url, stack.kafka_bootstrap, t_turns, memory)
            cids = [c["conversation_id"] for c in memory]
            await latency_phase(session, w.url, cids, a.qps, 2.0)  # warm-up, not reported
            lat = await latency_phase(session, w.url, cids, a.qps, a.seconds)

            def backlog(seed: int, prefix: str) -> list[dict]:
                cs = conversations(a.conversations, a.turns, seed=seed)
                for c in cs:
                    c["conversation_id"] = f"{prefix}-" + c["conversation_id"]
                return cs

            base1 = await ingest(session, w.url, stack.kafka_bootstrap, t_turns, backlog(201, "base1"))
            flood = await flood_phase(session, w.url, stack.kafka_bootstrap, t_turns, backlog(202, "flood"), cids,
                                      a.flood)
            base2 = await ingest(session, w.url, stack.kafka_bootstrap, t_turns, backlog(203, "base2"))
        return dict(lat=lat, base1=base1, base2=base2, flood=flood)
    finally:
        w.stop()


def summarise(r: dict, query_cache_bytes: int) -> QueryApiRun:
    lat, flood = r["lat"], r["flood"]
    b1 = r["base1"][0] / r["base1"][1]
    b2 = r["base2"][0] / r["base2"][1]
    base = (b1 + b2) / 2
    fl = flood["turns"] / flood["seconds"]
    return QueryApiRun(
        query_cache_bytes=query_cache_bytes, latency_idle_p50_ms=lat["p50"], latency_idle_p99_ms=lat["p99"],
        latency_idle_ok=lat["ok"], latency_idle_n=lat["n"], baseline_turns_per_s=base,
        baseline_spread=max(b1, b2) / min(b1, b2), flood_turns_per_s=fl, flood_over_baseline=fl / base,
        flood_answered=flood["answered"], flood_requests_per_s=flood["qps"], flood_p50_ms=flood["p50"],
        flood_p99_ms=flood["p99"], flood_codes={str(k): v for k, v in sorted(flood["codes"].items())})


def section(data: dict, wall_s: float) -> str:
    from stream.settings import Settings

    s = Settings()
    f = lambda path, fmt="", suffix="": marker(QUERY_API_FILE, data, path, fmt, suffix)  # noqa: E731
    modes = list(data["runs"])
    lines = [
        f"Command: `{f('run.command')}` ({f('run.date_utc')}; whole run {wall_s:.0f} s)  ",
        f"Host: {f('run.cpu')}; {f('run.machine')}, shared by broker, Redis, the benchmark's clients and the "
        "worker (and other engineers' test runs); worker torch threads: 1  ",
        "Model: tiny seeded qwen3 checkpoint (hidden 64, 4 layers, real Qwen3 tokenizer), CPU float32; one worker per "
        f"configuration, {a_partitions(data)} partitions; query settings at their defaults (queue {s.query_queue_max}, pass "
        f"of up to {s.query_batch_max} texts, share {s.query_share}, idle grace {s.query_idle_grace_ms:g} ms)  ",
        f"Backlogs: {f('backlog_turns', 'd')} turns each; queries read 8 conversations of 8 turns; requests are "
        "`POST /v1/embeddings` with `encoding_format: base64`. `EVOSTREAM_QUERY_CACHE_MAX_BYTES` per column "
        "(the query-ready memory, issue 22; `0` = off).",
        "",
        "| measure | " + " | ".join(f"query cache {m}" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]

    def row(label: str, path: str, fmt: str, suffix: str = "") -> str:
        return f"| {label} | " + " | ".join(f(f"runs.{m}.{path}", fmt, suffix) for m in modes) + " |"

    lines += [
        row(f"query latency at {data['qps']:g} requests/s, ingestion idle: p50, ms", "latency_idle_p50_ms", ".1f"),
        row("... p99, ms", "latency_idle_p99_ms", ".1f"),
        row("ingestion baseline (mean of the runs before and after the flood), turns/s", "baseline_turns_per_s", ".1f"),
        row("... the two baseline runs differ by (the machine's noise)", "baseline_spread", ".2f", "x"),
        row(f"ingestion under a flood of {data['flood_clients']} closed-loop clients (4 queries each), turns/s",
            "flood_turns_per_s", ".1f"),
        row("ingestion under the flood / baseline (target >= 0.8x)", "flood_over_baseline", ".2f", "x"),
        row("requests answered during the flood (4 queries each)", "flood_answered", "d"),
        row("... requests/s", "flood_requests_per_s", ".1f"),
        row("query p50 while the backlog is ingested, ms", "flood_p50_ms", ".0f"),
        row("query p99 while the backlog is ingested, ms", "flood_p99_ms", ".0f"),
        "",
        "- During the flood, queries are held to their share of the model thread (`QUERY_SHARE`) while the backlog "
        "is busy: a pass of q seconds is followed by a pause of q x (1 - share) / share, so shorter passes (the "
        "query-ready memory) also mean shorter pauses. With ingestion idle the worker answers at the first rows' "
        "latency.",
        "- The tiny checkpoint's queue positions are cheap (hidden 64): the query-ready memory's effect on the "
        "model is measured at the 0.8B shape in \"Query-ready memory\" below.",
    ]
    return "\n".join(lines)


def a_partitions(data: dict) -> int:
    return int(data.get("partitions", 4))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qps", type=float, default=20.0, help="stated query rate of the latency phase")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--flood", type=int, default=8, help="closed-loop query clients during the flood phase")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--query-cache", default="0,auto", help="EVOSTREAM_QUERY_CACHE_MAX_BYTES per run (one worker each)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args(argv)

    from workers.tiny_checkpoint import cached_tiny_checkpoint

    ckpt = str(cached_tiny_checkpoint("qwen3", "tiny"))
    run_dir = Path(tempfile.mkdtemp(prefix="evostream-bench-query-"))
    stack = LocalStack(run_dir / "stack", appendfsync="everysec", die_with_parent=True).start()
    t_start = time.time()
    runs: dict[str, QueryApiRun] = {}
    try:
        for mode in [m.strip() for m in a.query_cache.split(",") if m.strip()]:
            r = asyncio.run(run(a, stack, ckpt, run_dir, mode))
            runs["off" if mode == "0" else mode] = summarise(r, 0 if mode == "0" else _resolved(mode))
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ".venv/bin/python -m benchmarks.bench_query " + " ".join(argv if argv is not None else sys.argv[1:])
    res = QueryApiResults(run=RunInfo.now(cmd.strip()), qps=a.qps, seconds=a.seconds, flood_clients=a.flood,
                          backlog_turns=a.conversations * a.turns, runs=runs)
    data = res.model_dump(mode="json")
    data["partitions"] = a.partitions
    text = section(data, time.time() - t_start)
    print(text)
    if not a.no_write:
        write_json(res, RESULTS_DIR / QUERY_API_FILE)
        update_section(REPO / "BENCHMARKS.md", "Query API (issue 9)", text)
    return 0


def _resolved(mode: str) -> int:
    from workers.memory_budget import resolve_cache_bytes

    return resolve_cache_bytes("auto" if mode == "auto" else int(mode))


if __name__ == "__main__":
    raise SystemExit(main())
