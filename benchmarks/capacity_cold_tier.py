"""Cold tier freeze and thaw rates (issue #22): one SQLite file vs shards written in parallel.

`--conversations` conversations of the 0.8B shape (hidden 1024, float32 latents, `--turns` turns
each, driven through the real MemoryStore as benchmarks/capacity_measure.py does) in a local
Valkey without persistence; then, for each layout:

- `single`: one shard, one batch at a time (the layout before issue #22);
- `sharded`: `--shards` shards, `--concurrency` batches in flight (one freezer process);
- `two-freezers`: the same shards split between two freezers running at once (`--shards 0-7` and
  `--shards 8-15`, as two cron jobs would; here two tasks with their own Redis clients);

freeze everything (`freeze_idle(idle_s=0)`, batches of `--batch`), then thaw everything through the
store's load (batches of 16, as a worker's batch would). Rates are conversations/s and payload MiB/s,
measured on this host's disk (named in the results); the next layout starts from the thawed state.

Writes benchmarks/results/cold_tier.json; docs/CAPACITY.md renders it (scripts/capacity_report.py).
Run: .venv/bin/python -m benchmarks.capacity_cold_tier     (~2 min on 2 shared cores)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from pydantic import BaseModel, Field

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.capacity_measure import SimConversation  # noqa: E402
from benchmarks.results_schema import RESULTS_DIR, RunInfo, write_json  # noqa: E402
from devtools.localstack import RedisServer  # noqa: E402
from stream.identity import ConversationRef  # noqa: E402
from stream.state.cold_tier import ColdTier  # noqa: E402
from stream.state.store import MemoryStore  # noqa: E402

COLD_TIER_FILE = "cold_tier.json"
HIDDEN = 1024


class Layout(BaseModel):
    name: str
    shards: int
    freezers: int
    concurrency: int
    frozen: int
    payload_bytes: int
    file_bytes: int
    freeze_s: float
    freeze_per_s: float = Field(description="conversations frozen per second")
    freeze_mib_per_s: float
    thaw_s: float
    thaw_per_s: float
    thaw_mib_per_s: float
    all_thawed: bool


class ColdTierRun(BaseModel):
    run: RunInfo
    disk: str
    conversations: int
    turns: int
    hidden: int
    payload_bytes_per_conversation: float
    layouts: dict[str, Layout]


def _store(url: str, ns: str, cold: ColdTier | None) -> MemoryStore:
    return MemoryStore(url, fingerprint="capacity", hidden_size=HIDDEN, capacity=512, dtype=torch.float32,
                           namespace=ns, cold=cold)


async def fill(url: str, ns: str, refs: list[ConversationRef], turns: int, event: bytes) -> None:
    store = _store(url, ns, None)
    try:
        for i, ref in enumerate(refs):
            c = SimConversation(store, ref, 64, seed=i)
            await c.start()
            for _ in range(turns):
                await c.turn(event)
    finally:
        await store.close()


async def layout(url: str, ns: str, refs: list[ConversationRef], path: Path, *, name: str, shards: int,
                 freezers: int, concurrency: int, batch: int) -> Layout:
    cold = ColdTier(path, shards=shards)
    stores = [_store(url, ns, cold) for _ in range(freezers)]
    split = [set(range(k, shards, freezers)) for k in range(freezers)] if freezers > 1 else [None]
    t0 = time.perf_counter()
    reps = await asyncio.gather(*(cold.freeze_idle(s, 0, batch=batch, concurrency=concurrency, only_shards=only)
                                  for s, only in zip(stores, split)))
    freeze_s = time.perf_counter() - t0
    frozen = sum(r.frozen for r in reps)
    moved = sum(r.bytes_moved for r in reps)
    cold.checkpoint_wal()
    files = cold.file_bytes()
    t0 = time.perf_counter()
    got = {}
    for i in range(0, len(refs), 16):
        got.update(await stores[0].load_many(refs[i:i + 16]))
    thaw_s = time.perf_counter() - t0
    all_live = all(getattr(v, "live", False) for v in got.values()) and cold.count() == 0
    for s in stores:
        await s.close()
    cold.close()
    mib = moved / 2**20
    return Layout(name=name, shards=shards, freezers=freezers, concurrency=concurrency, frozen=frozen,
                  payload_bytes=moved, file_bytes=files, freeze_s=freeze_s, freeze_per_s=frozen / freeze_s,
                  freeze_mib_per_s=mib / freeze_s, thaw_s=thaw_s, thaw_per_s=len(refs) / thaw_s,
                  thaw_mib_per_s=mib / thaw_s, all_thawed=all_live)


def _disk(path: Path) -> str:
    """The filesystem the files were on (from /proc/mounts), for the reader to compare with theirs."""
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[2]):
                best = (dev, fs, mnt)
    except OSError:
        pass
    return f"{best[1]} at {best[2] or '?'} ({best[0]})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=96)
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    cmd = " ".join([".venv/bin/python -m benchmarks.capacity_cold_tier"] + list(argv if argv is not None else sys.argv[1:]))
    event = b"x" * 5500  # about an embedding event (docs/CAPACITY.md section 3): the outbox entry
    with tempfile.TemporaryDirectory(prefix="cold-bench-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False, die_with_parent=True)
        server.start()
        try:
            ns = f"cold-{uuid.uuid4().hex[:6]}"
            refs = [ConversationRef("acme", f"c-{i}") for i in range(args.conversations)]
            print(f"filling {len(refs)} conversations x {args.turns} turns (hidden {HIDDEN}) ...", file=sys.stderr)
            asyncio.run(fill(server.url, ns, refs, args.turns, event))
            plan = [("single", 1, 1, 1), ("sharded", args.shards, 1, args.concurrency),
                    ("two-freezers", args.shards, 2, args.concurrency)]
            layouts = {}
            for name, shards, freezers, conc in plan:
                print(f"{name}: {shards} shard(s), {freezers} freezer(s), {conc} batch(es) in flight ...", file=sys.stderr)
                lay = asyncio.run(layout(server.url, ns, refs, Path(tmp) / name, name=name, shards=shards,
                                         freezers=freezers, concurrency=conc, batch=args.batch))
                print(f"    freeze {lay.freeze_per_s:.1f}/s ({lay.freeze_mib_per_s:.0f} MiB/s), "
                      f"thaw {lay.thaw_per_s:.1f}/s ({lay.thaw_mib_per_s:.0f} MiB/s)", file=sys.stderr)
                layouts[name] = lay
            disk = _disk(Path(tmp))
        finally:
            server.stop()
    payload = layouts["single"].payload_bytes / max(1, layouts["single"].frozen)
    res = ColdTierRun(run=RunInfo.now(cmd), disk=disk, conversations=args.conversations, turns=args.turns,
                      hidden=HIDDEN, payload_bytes_per_conversation=payload, layouts=layouts)
    print(f"saved {write_json(res, args.results_dir / COLD_TIER_FILE)}", file=sys.stderr)
    print(res.model_dump_json(indent=1))
    return 0 if all(x.all_thawed and x.frozen == args.conversations for x in layouts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
