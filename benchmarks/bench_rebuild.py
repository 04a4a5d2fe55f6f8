"""Rebuild benchmark (issue #17): how fast `evostream rebuild` re-derives memories from the turns
topic, against live processing of the same turns, in one run on this machine.

One local stack (tansu + Redis), one turns topic holding N turns (a backlog). Then, one after
the other (never concurrently):
- live: one `evostream worker` drains the backlog; turns/s from its ready line to the group's
  committed offsets reaching the end (every turn checkpointed, embedded, emitted, acknowledged);
- rebuild, exact (the default: each turn stepped alone, bit for bit an offline replay) and
  batched (the live micro-batches): `evostream rebuild --into NS --through end`, turns/s from
  the command's own report (model loading excluded, as for the worker).
Both sides run the model on one thread (the worker's OMP_NUM_THREADS=1 in the test harness).
Sanity check: every conversation ends at the same seq in all three namespaces.

Run:  .venv/bin/python -m benchmarks.bench_rebuild  [--conversations 200 --turns 50]
Writes benchmarks/results/rebuild.json; BENCHMARKS.md's "Rebuild" section cites it with figure
markers (`python -m benchmarks.figures render`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pydantic import BaseModel  # noqa: E402
from support.workers import PipelineEnv, WorkerProc  # noqa: E402

from benchmarks.bench_e2e import conversations  # noqa: E402
from benchmarks.results_schema import RESULTS_DIR, RunInfo, write_json  # noqa: E402
from devtools.localstack import LocalStack  # noqa: E402
from stream.clients.producer import produce_records, turn_events  # noqa: E402
from stream.kafka.group_offsets import committed_offsets  # noqa: E402
from stream.kafka.topics import ensure_topics_sync  # noqa: E402

RESULTS_FILE = "rebuild.json"


class Side(BaseModel):
    turns: int
    seconds: float
    turns_per_s: float


class RebuildBench(BaseModel):
    run: RunInfo
    cpu: str
    conversations: int
    turns_per_conversation: int
    partitions: int
    live: Side
    rebuild_exact: Side
    rebuild_batched: Side
    exact_vs_live: float
    batched_vs_live: float
    same_seqs: bool


def cpu_model() -> str:
    """The host's CPU model, as every results file names it (workers/precision.py)."""
    from workers.precision import cpu_facts

    return cpu_facts().model


def live(stack: LocalStack, penv: PipelineEnv, total: int, log_dir: Path) -> Side:
    w = WorkerProc(penv, log_dir, name="live").start()
    try:
        w.wait_ready(180)
        t0 = time.monotonic()
        while True:
            done = sum(asyncio.run(committed_offsets(stack.kafka_bootstrap, penv.group_id, penv.turns_topic)).values())
            print(f"\r  live: {done}/{total} acknowledged", end="", file=sys.stderr, flush=True)
            if done >= total:
                break
            if not w.alive():
                raise RuntimeError(f"worker exited:\n{w.tail()}")
            time.sleep(0.5)
        secs = time.monotonic() - t0
        print(file=sys.stderr)
        return Side(turns=total, seconds=round(secs, 2), turns_per_s=round(total / secs, 1))
    finally:
        w.stop()


def rebuild(penv: PipelineEnv, into: str, batched: bool) -> Side:
    env = penv.env()
    cmd = [sys.executable, "-m", "stream.cli", "rebuild", "--into", into, "--through", "end"] + (
        ["--batched"] if batched else [])
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rep = json.loads(out.stdout)
    return Side(turns=rep["turns_applied"], seconds=rep["seconds"], turns_per_s=rep["turns_per_s"])


def seqs(redis_url: str, ns: str) -> dict[str, int]:
    import redis

    r = redis.Redis.from_url(redis_url)
    out = {}
    for k in r.scan_iter(f"{ns}:*:meta", count=1000):
        cid, seq = r.hmget(k, "cid", "seq")
        out[cid.decode()] = int(seq)
    r.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    command = ".venv/bin/python -m benchmarks.bench_rebuild" + (
        f" --conversations {args.conversations} --turns {args.turns}" if (args.conversations, args.turns) != (200, 50)
        else "")
    with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp:
        stack = LocalStack(Path(tmp) / "stack", die_with_parent=True)
        stack.start()
        try:
            tag = f"rb{int(time.time())}"
            topics = {f"bench.{tag}.turns": args.partitions, f"bench.{tag}.emb": args.partitions,
                      f"bench.{tag}.dlq": 1}
            ensure_topics_sync(stack.kafka_bootstrap, topics)
            t_turns, t_emb, t_dlq = list(topics)
            penv = PipelineEnv(stack.kafka_bootstrap, stack.redis_url, t_turns, t_emb, t_dlq, args.partitions,
                               namespace=f"{tag}live", extra={"OMP_NUM_THREADS": "1"})
            convs = conversations(args.conversations, args.turns)
            records = [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in turn_events(convs)]
            print(f"producing {len(records)} turns ...", file=sys.stderr)
            asyncio.run(produce_records(records, bootstrap=stack.kafka_bootstrap, topic=t_turns, progress=False))
            lv = live(stack, penv, len(records), Path(tmp))
            print(f"live: {lv.turns_per_s} turns/s", file=sys.stderr)
            ex = rebuild(penv, f"{tag}exact", batched=False)
            print(f"rebuild exact: {ex.turns_per_s} turns/s", file=sys.stderr)
            ba = rebuild(penv, f"{tag}batched", batched=True)
            print(f"rebuild batched: {ba.turns_per_s} turns/s", file=sys.stderr)
            same = seqs(stack.redis_url, f"{tag}live") == seqs(stack.redis_url, f"{tag}exact") == seqs(
                stack.redis_url, f"{tag}batched")
        finally:
            stack.stop(grace=3.0)
    res = RebuildBench(run=RunInfo.now(command), cpu=f"{cpu_model()} ({os.cpu_count()} CPUs, shared)",
                       conversations=args.conversations, turns_per_conversation=args.turns,
                       partitions=args.partitions, live=lv, rebuild_exact=ex, rebuild_batched=ba,
                       exact_vs_live=round(ex.turns_per_s / lv.turns_per_s, 2),
                       batched_vs_live=round(ba.turns_per_s / lv.turns_per_s, 2), same_seqs=same)
    path = write_json(res, RESULTS_DIR / RESULTS_FILE)
    print(res.model_dump_json(indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
