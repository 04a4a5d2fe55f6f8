"""Scale run on this machine (issue #14): many conversations in Redis, real workers, a rebalance.

What it does, in order:

1. starts its own broker + Redis (devtools.localstack), creates the topics;
2. seeds `--conversations` conversations of the seeded tiny model (qwen3, hidden 64) directly
   through the real MemoryStore (lengths 1..`--max-turns` turns, random latents of the
   model's shape, the worker's model fingerprint), in batches of one round trip each;
3. compares Redis memory (`INFO used_memory` growth) with the model of docs/CAPACITY.md:
   the sum over conversations of the measured bytes of one conversation of that length
   (`MEMORY USAGE` of a probe conversation after each of its turns);
4. starts one real worker (`evostream worker` subprocess), produces `--live-turns` turns that
   continue seeded conversations (and a few new ones), starts a second worker once a third of
   them is done (the group reassigns partitions while turns flow), waits for every embedding;
5. reports throughput, how the emitted events' `memory` field says the seeded memories were
   continued, dead letters, and Redis memory per conversation after the run.

Sized for a 2-core machine shared with other work: `--conversations 20000 --live-turns 300`.
Results: benchmarks/results/capacity_scale.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.workers import PipelineEnv, WorkerProc, read_topic, wait_for  # noqa: E402

from benchmarks.report import update_section  # noqa: E402
from stream.state.records import TurnCommit
from stream.state.store import MemoryStore
from stream.identity import ConversationRef  # noqa: E402
from devtools.localstack import LocalStack  # noqa: E402
from stream.clients.producer import produce_records  # noqa: E402
from stream.kafka.topics import ensure_topics_sync  # noqa: E402
from workers.state import ConversationState, StateDelta  # noqa: E402

TENANT = "scale"
L, C, SEG = 16, 512, 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _deltas_for(state: ConversationState, n: int, rng: random.Random, gen: torch.Generator) -> list[StateDelta]:
    out = []
    for _ in range(n):
        d = StateDelta(seq=state.seq + 1, new_segment=state.seq < 0 or len(state.segment_token_ids) >= SEG,
                       token_ids=[rng.randrange(200, 20_000) for _ in range(rng.randint(40, 90))],
                       latents=torch.randn(L, state.hidden_size, generator=gen) * 0.05)
        state.apply(d)
        out.append(d)
    return out


async def seed(url: str, ns: str, fp: str, hidden: int, n: int, max_turns: int, batch: int) -> dict[str, int]:
    """n conversations of 1..max_turns turns each; returns {cid: turns}."""
    store = MemoryStore(url, fingerprint=fp, hidden_size=hidden, capacity=C, dtype=torch.float32,
                            namespace=ns, ttl_s=7 * 24 * 3600)
    await store.prepare()
    rng = random.Random(14)
    gen = torch.Generator().manual_seed(14)
    lengths: dict[str, int] = {}
    try:
        for start in range(0, n, batch):
            commits = []
            for i in range(start, min(n, start + batch)):
                cid = f"s-{i:06d}"
                k = rng.randint(1, max_turns)
                st = ConversationState(hidden_size=hidden, capacity=C, dtype=torch.float32)
                commits.append(TurnCommit(ConversationRef(TENANT, cid), -1, st, _deltas_for(st, k, rng, gen), {},
                                          fresh=True))
                lengths[cid] = k
            res = await store.commit(commits)
            assert all(r.applied for r in res), [r for r in res if not r.applied][:3]
            if (start // batch) % 10 == 0:
                log(f"  seeded {min(n, start + batch):,}/{n:,}")
    finally:
        await store.close()
    return lengths


async def probe_bytes(url: str, r: redis.Redis, fp: str, hidden: int, max_turns: int) -> dict[int, int]:
    """The model's per-conversation figure at this shape: MEMORY USAGE after each turn, mean of 5
    probe conversations (token counts vary)."""
    ns = f"probe-{uuid.uuid4().hex[:6]}"
    store = MemoryStore(url, fingerprint=fp, hidden_size=hidden, capacity=C, dtype=torch.float32, namespace=ns)
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    by_turn: dict[int, list[int]] = {k: [] for k in range(1, max_turns + 1)}
    try:
        for p in range(5):
            ref = ConversationRef(TENANT, f"probe-{p}")
            st = ConversationState(hidden_size=hidden, capacity=C, dtype=torch.float32)
            for k in range(1, max_turns + 1):
                start = st.seq
                ds = _deltas_for(st, 1, rng, gen)
                res = await store.commit([TurnCommit(ref, start, st, ds, {}, fresh=start < 0)])
                assert res[0].applied
                by_turn[k].append(sum(int(r.memory_usage(key, samples=0) or 0) for key in store.keys(ref)))
        for key in r.scan_iter(match=f"{ns}:*"):
            r.delete(key)
    finally:
        await store.close()
    return {k: round(statistics.fmean(v)) for k, v in by_turn.items()}


def scrape_applied(url: str) -> float:
    """evostream_turns_applied_total of one worker (its /metrics)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("evostream_turns_applied_total ") or line.startswith("evostream_turns_applied_total{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def turn_record(cid: str, seq: int, rng: random.Random, tenant: str | None = TENANT) -> tuple[bytes, bytes]:
    words = "refund order parcel card week size jacket shop exchange courier invoice warranty login plan".split()
    body = {"type": "turn", "conversation_id": cid, "seq": seq, "tenant": tenant,
            "messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))},
                         {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))}],
            "timestamp": datetime.now(timezone.utc).isoformat()}
    return cid.encode(), json.dumps(body).encode()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=20_000)
    ap.add_argument("--max-turns", type=int, default=8, help="seeded lengths are uniform in 1..this")
    ap.add_argument("--live-turns", type=int, default=300)
    ap.add_argument("--new-conversations", type=int, default=20, help="live turns of conversations not seeded")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--rate", type=float, default=4.0, help="live turns produced per second (so the 2nd worker joins mid-stream)")
    ap.add_argument("--second-worker-after-s", type=float, default=0.0,
                    help="start the 2nd worker this long after producing began (it joins the group while turns flow)")
    ap.add_argument("--seed-batch", type=int, default=500)
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "capacity_scale.json")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true",
                    help="only rewrite the BENCHMARKS.md section from the saved results (--out)")
    args = ap.parse_args(argv)
    if args.render_only:
        import shlex

        res = json.loads(args.out.read_text())
        write_section(res, ap.parse_args(shlex.split(res["command"])[3:]))  # the run's own arguments
        return
    cmd = "python -m benchmarks.capacity_scale " + " ".join(argv if argv is not None else sys.argv[1:])

    from workers.loading import checkpoint_fingerprint
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    ckpt = cached_tiny_checkpoint("qwen3", "tiny")
    fp = checkpoint_fingerprint(ckpt)
    hidden = json.loads((ckpt / "config.json").read_text()).get("hidden_size") or 64
    t_all = time.time()
    res: dict[str, Any] = {"command": cmd, "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "machine": f"{platform.platform()}, 2 CPUs shared with other work",
                           "model": f"seeded tiny qwen3 (hidden {hidden}), float32", "partitions": args.partitions}
    with tempfile.TemporaryDirectory(prefix="capscale-") as tmp:
        stack = LocalStack(Path(tmp) / "stack", appendfsync="everysec", die_with_parent=True)
        stack.start()
        workers: list[WorkerProc] = []
        try:
            url = stack.redis_url
            r = redis.Redis.from_url(url)
            penv = PipelineEnv(stack.kafka_bootstrap, url, f"cap-turns-{uuid.uuid4().hex[:6]}",
                               f"cap-emb-{uuid.uuid4().hex[:6]}", f"cap-dl-{uuid.uuid4().hex[:6]}", args.partitions,
                               checkpoint=str(ckpt), extra={"EVOSTREAM_BATCH_MAX_TURNS": "32"})
            ensure_topics_sync(stack.kafka_bootstrap, {penv.turns_topic: args.partitions,
                                                       penv.embeddings_topic: args.partitions,
                                                       penv.dead_letter_topic: 1})
            log("probe: bytes of one conversation by length (the model's figure at this shape)")
            model_by_turn = asyncio.run(probe_bytes(url, r, fp, hidden, args.max_turns))
            used0 = int(r.info("memory")["used_memory"])
            log(f"seeding {args.conversations:,} conversations")
            t0 = time.time()
            lengths = asyncio.run(seed(url, penv.namespace, fp, hidden, args.conversations, args.max_turns,
                                       args.seed_batch))
            seed_s = time.time() - t0
            used1 = int(r.info("memory")["used_memory"])
            predicted = sum(model_by_turn[k] for k in lengths.values())
            # a sample of the seeded conversations, measured directly
            sample = random.Random(3).sample(sorted(lengths), 200)
            store_keys = MemoryStore(url, fingerprint=fp, hidden_size=hidden, capacity=C, dtype=torch.float32,
                                         namespace=penv.namespace)
            sample_bytes = [sum(int(r.memory_usage(k, samples=0) or 0) for k in store_keys.keys(ConversationRef(TENANT, c)))
                            for c in sample]
            sample_pred = [model_by_turn[lengths[c]] for c in sample]
            asyncio.run(store_keys.close())
            res["seed"] = {
                "conversations": len(lengths), "turns": sum(lengths.values()),
                "mean_turns": statistics.fmean(lengths.values()), "seconds": seed_s,
                "used_memory_growth": used1 - used0, "model_prediction": predicted,
                "actual_over_model": (used1 - used0) / predicted,
                "used_memory_per_conversation": (used1 - used0) / len(lengths),
                "model_bytes_by_turn": model_by_turn,
                "sample_200_memory_usage_over_model": sum(sample_bytes) / sum(sample_pred),
                "keys": int(r.dbsize()), "keys_per_conversation": int(r.dbsize()) / len(lengths),
            }
            log(f"seeded in {seed_s:.0f} s: used_memory +{(used1 - used0) / 2**20:.1f} MiB, model "
                f"{predicted / 2**20:.1f} MiB (x{(used1 - used0) / predicted:.3f})")

            # live stream: continue seeded conversations, plus some new ones
            rng = random.Random(5)
            chosen = rng.sample(sorted(lengths), max(1, (args.live_turns - args.new_conversations) // 2))
            recs: list[tuple[bytes, bytes]] = []
            for cid in chosen:
                for j in range(2):
                    recs.append(turn_record(cid, lengths[cid] + j, rng))
            for i in range(args.new_conversations):
                recs.append(turn_record(f"new-{i:04d}", 0, rng))
            recs = recs[: args.live_turns]
            rng.shuffle(recs)
            recs.sort(key=lambda kv: json.loads(kv[1])["seq"])  # a conversation's turns in order
            log(f"starting worker 1; then producing {len(recs)} live turns at {args.rate:g}/s")
            w1 = WorkerProc(penv, Path(tmp), "w1").start()
            workers.append(w1)
            w1.wait_ready(timeout=180)
            log("worker 1 ready")
            t_live = time.time()
            producer = threading.Thread(target=lambda: asyncio.run(produce_records(
                recs, bootstrap=stack.kafka_bootstrap, topic=penv.turns_topic, rate=args.rate, progress=False)))
            producer.start()

            def emitted() -> int:
                return len(asyncio.run(read_topic(stack.kafka_bootstrap, penv.embeddings_topic, idle_ms=500)))

            time.sleep(args.second_worker_after_s)
            log("starting worker 2 (it joins the group, and partitions are reassigned, while turns flow)")
            t_rebal = time.time()
            w2 = WorkerProc(penv, Path(tmp), "w2").start()
            workers.append(w2)
            w2.wait_ready(timeout=180)
            t_w2_ready = time.time() - t_live
            log(f"worker 2 ready {t_w2_ready:.0f} s after producing began")
            wait_for(lambda: emitted() >= len(recs), timeout=args.timeout_s, interval=2, what="every embedding")
            live_s = time.time() - t_live
            producer.join()
            applied = {w.name: scrape_applied(w.url) for w in workers}
            events = [json.loads(m.value) for m in asyncio.run(read_topic(stack.kafka_bootstrap, penv.embeddings_topic))]
            dls = asyncio.run(read_topic(stack.kafka_bootstrap, penv.dead_letter_topic, idle_ms=500))
            emb = [e for e in events if e.get("type") == "embedding"]
            keys = Counter((e["conversation_id"], e["seq"]) for e in emb)
            seeded_first = [e for e in emb if e["conversation_id"] in lengths and e["seq"] == lengths[e["conversation_id"]]]
            used2 = int(r.info("memory")["used_memory"])
            n_total = len(lengths) + args.new_conversations
            res["live"] = {
                "turns_produced": len(recs), "embeddings": len(emb), "distinct_turns_embedded": len(keys),
                "duplicates": len(emb) - len(keys), "dead_letters": len(dls), "seconds": live_s,
                "turns_per_s": len(keys) / live_s, "second_worker_started_after_s": t_rebal - t_live,
                "memory_of_first_live_turn_of_seeded": dict(Counter(e.get("memory") for e in seeded_first)),
                "memory_len_of_first_live_turn_mean": statistics.fmean(e["memory_len"] for e in seeded_first)
                if seeded_first else None,
                "turns_applied_by_worker": applied, "second_worker_ready_after_s": t_w2_ready,
                "used_memory_after": used2 - used0, "used_memory_per_conversation_after": (used2 - used0) / n_total,
            }
            log(f"live: {len(keys)} turns in {live_s:.0f} s; memory {res['live']['memory_of_first_live_turn_of_seeded']}")
            r.close()
        finally:
            for w in workers:
                w.stop()
            stack.stop(grace=3.0)
    res["wall_s"] = time.time() - t_all
    s, lv = res["seed"], res["live"]
    res["summary"] = {
        "conversations seeded through the store": f"{s['conversations']:,} ({s['turns']:,} turns, 1..{args.max_turns} each)",
        "Redis used_memory growth / model (sum of measured per-length bytes)": f"{s['used_memory_growth'] / 2**20:,.1f} MiB / {s['model_prediction'] / 2**20:,.1f} MiB = {s['actual_over_model']:.3f}",
        "Redis bytes per conversation (hidden 64, mean length)": f"{s['used_memory_per_conversation']:,.0f}",
        "live turns through 2 workers (2nd started mid-stream)": f"{lv['distinct_turns_embedded']} of {lv['turns_produced']} embedded in {lv['seconds']:.0f} s (produced at {args.rate:g}/s), {lv['duplicates']} duplicates, {lv['dead_letters']} dead letters",
        "turns applied per worker (the 2nd took over partitions mid-stream)": f"{lv['turns_applied_by_worker']}",
        "Redis keys per conversation": f"{s['keys_per_conversation']:.2f} (meta, deltas, marker; a base after the first compaction)",
        "seeded memories continued by the workers": f"{lv['memory_of_first_live_turn_of_seeded']}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    log(f"wrote {args.out} ({res['wall_s']:.0f} s)")
    if not args.no_write:
        write_section(res, args)


def write_section(res: dict, args: argparse.Namespace) -> None:
    """The BENCHMARKS.md section from a run's results (also re-rendered from the saved JSON
    with `--render-only`, so a section lost to a concurrent edit need not be re-measured)."""
    cmd, s, lv = res["command"], res["seed"], res["live"]
    if True:
        body = [f"Command: `{cmd}` ({res['date_utc']}; whole run {res['wall_s']:.0f} s)  ",
                f"Machine: {res['machine']}; model: {res['model']}; {args.partitions} partitions; "
                "local tansu broker + valkey (appendfsync everysec), started by the script.", "",
                "| figure | value |", "|---|---|"]
        body += [f"| {k} | {v} |" for k, v in res["summary"].items()]
        body += ["", f"Seeding: {s['seconds']:.0f} s ({s['conversations'] / s['seconds']:,.0f} conversations/s in batches "
                 f"of {args.seed_batch}, one round trip each). Model per length (bytes, `MEMORY USAGE` of a probe "
                 f"conversation): {s['model_bytes_by_turn']}. Sample of 200 seeded conversations, `MEMORY USAGE` over "
                 f"model: {s['sample_200_memory_usage_over_model']:.3f}. Redis per conversation after the live run "
                 f"(all {s['conversations'] + args.new_conversations:,}): {lv['used_memory_per_conversation_after']:,.0f} B.",
                 "",
                 f"A bigger run (the issue's 4 workers x 100k conversations) needs a machine of its own: at hidden 64, "
                 f"100k conversations of this length mix would be {100_000 / s['conversations']:.0f}x the Redis above "
                 f"(~{100_000 * s['used_memory_per_conversation'] / 2**30:.1f} GiB), seeding ran at "
                 f"{s['turns'] / s['seconds']:,.0f} turns/s here (CPU-bound in the script), and each worker needs a core "
                 "of its own for the model step; at the released sizes multiply the memory by the per-conversation "
                 "figures of docs/CAPACITY.md."]
        update_section(REPO / "BENCHMARKS.md", "Capacity scale run (issue 14)", "\n".join(body))


if __name__ == "__main__":
    main()
