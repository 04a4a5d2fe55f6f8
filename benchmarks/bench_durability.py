"""What durability before acknowledgement costs: checkpoint commit latency per batch with
EVOSTREAM_REDIS_DURABILITY=reply vs aof (WAITAOF), under appendfsync everysec and always.

One real Redis (the local stack's server binary) per configuration, on this machine's disk;
batches of 8 conversations, one turn each, tiny-model-sized states (hidden 64), the same
commit path the pipeline uses. Ratios are measured in the same run.

    .venv/bin/python -m benchmarks.bench_durability [--batches 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from stream.state.records import TurnCommit
from stream.state.store import MemoryStore
from devtools.localstack import RedisServer
from stream.settings import Durability
from workers.state import ConversationState, StateDelta

RESULTS_DIR = Path(__file__).resolve().parent / "results"

HIDDEN, CAPACITY, LATENTS, CONVS = 64, 512, 16, 8


async def _measure(url: str, durability: Durability, batches: int) -> list[float]:
    store = MemoryStore(url, fingerprint="bench", hidden_size=HIDDEN, capacity=CAPACITY,
                            dtype=torch.float32, namespace=f"bd-{durability.value}", durability=durability)
    states = {f"c{i}": ConversationState(hidden_size=HIDDEN, capacity=CAPACITY) for i in range(CONVS)}
    times = []
    try:
        await store.prepare()
        for _ in range(batches):
            commits = []
            for cid, st in states.items():
                before = st.seq
                d = StateDelta(seq=st.seq + 1, new_segment=st.seq % 16 == 15, token_ids=list(range(40)),
                               latents=torch.randn(LATENTS, HIDDEN))
                st.apply(d)
                commits.append(TurnCommit(ref=cid, expected_seq=before, state=st, deltas=[d],
                                          outbox={st.seq: b"x" * 6000}))
            t = time.perf_counter()
            res = await store.commit(commits)
            times.append((time.perf_counter() - t) * 1000)
            assert all(r.applied for r in res)
    finally:
        await store.close()
    return times


def _cpu_model() -> str:
    """The host's CPU model, as every results file names it (workers/precision.py)."""
    from workers.precision import cpu_facts

    return cpu_facts().model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where durability.json is written")
    args = ap.parse_args()
    print(f"commit latency per batch ({CONVS} conversations x 1 turn, hidden {HIDDEN}), {args.batches} batches")
    print("| appendfsync | durability | p50 ms | p99 ms | mean ms |")
    print("|---|---|---|---|---|")
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fsync in ("everysec", "always"):
            server = RedisServer(Path(tmp) / fsync, appendfsync=fsync)
            server.start()
            try:
                for d in (Durability.REPLY, Durability.AOF):
                    t = sorted(asyncio.run(_measure(server.url, d, args.batches)))
                    p99 = t[min(len(t) - 1, int(0.99 * len(t)))]
                    rows[f"{fsync}/{d.value}"] = {"p50_ms": statistics.median(t), "p99_ms": p99,
                                                  "mean_ms": statistics.fmean(t)}
                    print(f"| {fsync} | {d.value} | {statistics.median(t):.2f} | {p99:.2f} | {statistics.fmean(t):.2f} |")
            finally:
                server.stop()
    # The figures README.md quotes are rendered from this file (benchmarks/figures.py). The
    # host matters (disk fsync, CPU): it is named, and the load it ran under.
    out = args.results_dir / "durability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m benchmarks.bench_durability " + " ".join(sys.argv[1:]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{_cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_1min_at_end": os.getloadavg()[0],
        "batches": args.batches, "conversations_per_batch": CONVS, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
