"""End-to-end benchmark: turns topic -> worker -> embeddings topic, on the local stack.

Measures, in one run on this machine (CPU, tiny checkpoint):
- throughput: a backlog of N turns produced up front, drained by one worker (turns/s);
- latency at a stated load: turns produced at a fixed rate; p50/p99 of
  (embedding record timestamp - turn record timestamp), both stamped by producers on this
  machine's clock;
- where the time goes: the worker's own histograms (/metrics): model step vs whole batch,
  and the fraction of the batch time spent outside the model step.

Run:  .venv/bin/python -m benchmarks.bench_e2e  [--conversations 32 --turns 20 --rate 40]
      .venv/bin/python -m benchmarks.bench_e2e --rates 2,5,10,20   (latency vs load: one steady
      phase per offered rate, each with a fresh worker and topics)
Writes/updates the "End-to-end" section of BENCHMARKS.md with the command and the numbers, and
saves each phase's latencies under benchmarks/results/e2e_load.json (by section) for
`python -m benchmarks.plots` (issue 11).
"""

from __future__ import annotations

import argparse
import shlex
import asyncio
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.workers import PipelineEnv, WorkerProc, read_topic  # noqa: E402

from benchmarks.report import update_section  # noqa: E402
from benchmarks.results_schema import (RESULTS_DIR, E2E_TINY_MODEL, E2EPhase, E2ERun, RunInfo,  # noqa: E402
                                       record_e2e_run)
from devtools.localstack import LocalStack  # noqa: E402
from stream.clients.producer import produce_records, turn_events  # noqa: E402
from stream.kafka.topics import ensure_topics_sync  # noqa: E402


def conversations(n: int, turns: int, seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ("order refund shipping invoice password account delivery parcel customs charge card "
             "subscription plan upgrade error reset schedule flight booking seat bag").split()
    out = []
    for c in range(n):
        ts = []
        for _ in range(turns):
            u = " ".join(rng.choice(words, size=int(rng.integers(6, 30))))
            a = " ".join(rng.choice(words, size=int(rng.integers(4, 30))))
            ts.append({"user": u, "assistant": a})
        out.append({"conversation_id": f"bench-{c:04d}", "turns": ts})
    return out


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    vals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(evostream_[a-z_]+(?:_sum|_count|_total)?)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m and not m.group(2):
            vals[m.group(1)] = float(m.group(3))
    return vals


async def wait_embeddings(bootstrap: str, topic: str, want: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    got: list = []
    while time.monotonic() < deadline:
        got = await read_topic(bootstrap, topic, idle_ms=800)
        n = len({(json.loads(r.value)["conversation_id"], json.loads(r.value)["seq"]) for r in got})
        print(f"\r  embeddings {n}/{want}", end="", file=sys.stderr, flush=True)
        if n >= want:
            print(file=sys.stderr)
            return got
        await asyncio.sleep(1.0)
    raise TimeoutError(f"only {len(got)} of {want} embeddings after {timeout}s")


def phase(stack: LocalStack, ckpt: str, records: list[tuple[bytes, bytes]], rate: float, label: str,
          log_dir: Path, partitions: int, extra: dict[str, str] | None = None) -> dict:
    tag = f"{label}-{int(time.time())}"
    topics = {f"bench.{tag}.turns": partitions, f"bench.{tag}.emb": partitions, f"bench.{tag}.dlq": 1}
    ensure_topics_sync(stack.kafka_bootstrap, topics)
    t_turns, t_emb, t_dlq = list(topics)
    penv = PipelineEnv(stack.kafka_bootstrap, stack.redis_url, t_turns, t_emb, t_dlq, partitions, checkpoint=ckpt,
                       extra=dict(extra or {}))
    w = WorkerProc(penv, log_dir, name=label).start()
    try:
        w.wait_ready(120)
        before = scrape(w.url)
        print(f"[{label}] producing {len(records)} turns" + (f" at {rate:g}/s" if rate else " as a backlog"), file=sys.stderr)
        t0 = time.time()
        asyncio.run(produce_records(records, bootstrap=stack.kafka_bootstrap, topic=t_turns, rate=rate, progress=False))
        got = asyncio.run(wait_embeddings(stack.kafka_bootstrap, t_emb, len(records), timeout=900))
        after = scrape(w.url)
        turns_by_key = {}
        for r in asyncio.run(read_topic(stack.kafka_bootstrap, t_turns)):
            d = json.loads(r.value)
            turns_by_key[(d["conversation_id"], d["seq"])] = r.timestamp
        first = {}
        for r in got:
            d = json.loads(r.value)
            k = (d["conversation_id"], d["seq"])
            first[k] = min(first.get(k, r.timestamp), r.timestamp)
        lat = np.array([first[k] - turns_by_key[k] for k in first if k in turns_by_key], dtype=float)
        wall = max(first.values()) / 1000 - t0
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        batch_s = d.get("evostream_batch_seconds_sum", 0.0)
        step_s = d.get("evostream_step_seconds_sum", 0.0)
        return dict(
            label=label, turns=len(records), rate=rate, wall_s=wall, turns_per_s=len(records) / wall,
            p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
            p90_ms=float(np.percentile(lat, 90)), max_ms=float(lat.max()), latencies_ms=lat.tolist(),
            batches=d.get("evostream_batch_turns_count", 0.0),
            mean_batch=d.get("evostream_batch_turns_sum", 0.0) / max(1.0, d.get("evostream_batch_turns_count", 0.0)),
            step_s=step_s, load_s=d.get("evostream_state_load_seconds_sum", 0.0),
            checkpoint_s=d.get("evostream_checkpoint_seconds_sum", 0.0), emit_s=d.get("evostream_emit_seconds_sum", 0.0),
            batch_s=batch_s, outside_step_frac_of_batch=(1 - step_s / batch_s) if batch_s else float("nan"),
            outside_step_frac_of_wall=(1 - step_s / wall) if wall else float("nan"),
        )
    finally:
        w.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--rate", type=float, default=10.0, help="stated load for the latency phase (turns/s)")
    ap.add_argument("--rates", default="",
                    help="latency vs load (issue 11): comma-separated offered rates (turns/s), one steady phase "
                         "each, instead of the one --rate")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where e2e_load.json is kept")
    ap.add_argument("--no-results", action="store_true", help="do not save the phases' latencies")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    # issue 10: the worker's segment-prefix cache, and where the figures go (before/after runs)
    ap.add_argument("--prefix-cache-bytes", type=int, default=0, help="EVOSTREAM_PREFIX_CACHE_MAX_BYTES of the worker")
    ap.add_argument("--section", default="End-to-end pipeline (issue 3)", help="BENCHMARKS.md section to write")
    a = ap.parse_args(argv)
    extra = {"EVOSTREAM_PREFIX_CACHE_MAX_BYTES": str(a.prefix_cache_bytes)}
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    ckpt = str(cached_tiny_checkpoint("qwen3", "tiny"))
    convs = conversations(a.conversations, a.turns)
    records = [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in turn_events(convs)]
    run_dir = Path(tempfile.mkdtemp(prefix="evostream-bench-"))
    stack = LocalStack(run_dir / "stack", appendfsync="everysec", die_with_parent=True).start()
    try:
        backlog = phase(stack, ckpt, records, 0.0, "backlog", run_dir, a.partitions, extra)
        rates = [float(x) for x in a.rates.split(",") if x.strip()] or [a.rate]
        steadies = [phase(stack, ckpt, records, r, "steady" if len(rates) == 1 else f"steady-{r:g}", run_dir,
                          a.partitions, extra) for r in rates]
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    cmd = (("" if a.rates else "make bench-e2e   # = ") + ".venv/bin/python -m benchmarks.bench_e2e "
           + shlex.join(argv or sys.argv[1:]))
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.platform()}, "
        f"{__import__('os').cpu_count()} CPUs shared by broker, Redis, producer and worker; worker torch threads: "
        f"{PipelineEnv('', '', '', '', '', 1).env().get('OMP_NUM_THREADS', 'default')}; torch {torch.__version__}  ",
        f"Model: tiny seeded qwen3 checkpoint (hidden 64, 4 layers, real Qwen3 tokenizer), CPU float32; "
        f"one worker, {a.partitions} partitions, local tansu broker + valkey (appendfsync everysec); "
        f"worker EVOSTREAM_PREFIX_CACHE_MAX_BYTES={a.prefix_cache_bytes}  ",
        f"Traffic: {a.conversations} conversations x {a.turns} turns = {len(records)} turns, interleaved",
        "",
        "| phase | load | turns/s | p50 latency ms | p99 latency ms | batches | mean turns/batch | model step s | load s | checkpoint s | emit s | batch s | outside step (of batch time) | outside step (of wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (backlog, *steadies):
        load = "backlog (all produced up front)" if not r["rate"] else f"{r['rate']:g} turns/s"
        lines.append(
            f"| {r['label']} | {load} | {r['turns_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['batches']:.0f} | "
            f"{r['mean_batch']:.1f} | {r['step_s']:.2f} | {r['load_s']:.2f} | {r['checkpoint_s']:.2f} | {r['emit_s']:.2f} | "
            f"{r['batch_s']:.2f} | {100 * r['outside_step_frac_of_batch']:.0f}% | {100 * r['outside_step_frac_of_wall']:.0f}% |")
    lines += ["", "Latency is from the turn record's timestamp (producer) to the first embedding record's timestamp "
              "(worker's producer); in the backlog phase it includes waiting behind the whole backlog."]
    text = "\n".join(lines)
    print(text)
    if not a.no_results:
        run = E2ERun(run=RunInfo.now(cmd.split("# = ", 1)[-1].strip()), section=a.section, model=E2E_TINY_MODEL,
                     prefix_cache_bytes=a.prefix_cache_bytes, conversations=a.conversations,
                     turns_per_conversation=a.turns, partitions=a.partitions,
                     phases=[E2EPhase(**{k: r[k] for k in E2EPhase.model_fields}) for r in (backlog, *steadies)])
        print(f"saved {record_e2e_run(run, a.results_dir)}", file=sys.stderr)
    if not a.no_write:
        update_section(REPO / "BENCHMARKS.md", a.section, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
