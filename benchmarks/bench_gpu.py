"""GPU figures at realistic size (issue 10): one command, bfloat16 on CUDA, a few minutes.

The same random-weight model shape as benchmarks/bench_realistic.py (Qwen3.5-0.8B-shaped,
`qwen35_08b`), on the GPU in bfloat16. `--convs` conversations, each with a full queue (512
latents), stream one whole 16-turn segment together: every step call carries one turn of each
conversation (so each pass batches rows with different cached prefix lengths). Run without any
cache, with the segment-prefix cache, and with both caches (prefix + the query-ready memory, issue
#22: the default configuration); then `--query-reps` passes of one query per conversation against
the queues the last run left, with and without the query-ready memory: queries/s and positions
per query / the query's own tokens. Reported per path: turns/s, positions (tokens) computed
per second, and the fraction of the device's dense bf16 peak, counting 2 x (parameters a position
is multiplied through: backbone without the embedding table, one LoRA adapter, the heads) FLOPs per
computed position; attention over the prefixes is not counted, so this is a lower bound.

Run:   .venv/bin/python -m benchmarks.bench_gpu                   (writes the BENCHMARKS.md section)
Smoke: .venv/bin/python -m benchmarks.bench_gpu --device cpu --size tiny --convs 4 --turns 3 --no-write
Needs a CUDA build of torch; budget: model build ~1 min on 16 cores, then well under 5 minutes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import random
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import BF16_PEAK_TFLOPS, Report, flop_params, log, machine, make_turn, peak_tflops
from benchmarks.bench_realistic import full_queue_state
from benchmarks.report import update_section
from workers.engine import EngineConfig, EvoEngine
from workers.tiny_checkpoint import build_tiny_model
from workers.tokenizer import load_qwen_tokenizer

REPO = Path(__file__).resolve().parents[1]
SECTION = "GPU at realistic size: Qwen3.5-0.8B-shaped, bfloat16 (issue 10)"


def run_path(engine: EvoEngine, n_conv: int, turns: int, sync, label: str,
             keep: dict | None = None) -> dict[str, float]:
    base = full_queue_state(engine)
    states = {f"g{c:03d}": base.copy() for c in range(n_conv)}
    if keep is not None:
        keep["states"] = states
    rng = random.Random(4)
    plan = [[make_turn(rng, f"g{c:03d}", 100 + k, (10, 20), (15, 25)) for c in range(n_conv)] for k in range(turns)]
    engine.drop_conversation_caches()
    positions = 0
    per_step: list[float] = []
    sync()
    t_all = time.perf_counter()
    for k, batch in enumerate(plan):
        t0 = time.perf_counter()
        engine.step(states, batch)
        sync()
        per_step.append(time.perf_counter() - t0)
        positions += engine.last_stats.real_tokens
        log(f"    [{label}] step {k + 1}/{turns}: {1000 * per_step[-1]:.0f} ms, {engine.last_stats.real_tokens:,} positions")
    wall = time.perf_counter() - t_all
    return {"wall": wall, "positions": float(positions), "turns": float(n_conv * turns),
            "first": per_step[0], "rest": sum(per_step[1:]) / max(1, len(per_step) - 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="qwen35_08b")
    ap.add_argument("--convs", type=int, default=64)
    ap.add_argument("--turns", type=int, default=16, help="turns per conversation (16 = one whole segment)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--cache-gib", type=float, default=16.0, help="prefix cache budget (GiB)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--query-reps", type=int, default=3, help="query passes per path (median)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): nothing measured", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"building the random {args.size} model (LoRA r={args.lora_r}) on the CPU, then {args.dtype} on {name} ...")
    model = build_tiny_model("qwen3_5", args.size, seed=0, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    model = model.to(device=dev, dtype={"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype])
    tok = load_qwen_tokenizer("qwen3_5")
    plain = EvoEngine(model, tok)
    cached = EvoEngine(model, tok, config=EngineConfig(prefix_cache_max_bytes=int(args.cache_gib * 2**30)))
    both = EvoEngine(model, tok, config=EngineConfig(prefix_cache_max_bytes=int(args.cache_gib * 2**30),
                                                     query_cache_max_bytes=int(args.cache_gib * 2**30)))
    log("warm-up ...")
    run_path(cached, min(4, args.convs), 2, sync, "warm-up")
    rep = Report()
    n_params = flop_params(plain)
    peak = peak_tflops(name, args.peak_tflops) if dev.type == "cuda" else None
    res = {}
    kept: dict = {}
    for label, eng in (("uncached", plain), ("prefix cache", cached), ("both caches", both)):
        log(f"{label}: {args.convs} conversations x {args.turns} turns ...")
        r = run_path(eng, args.convs, args.turns, sync, label, keep=kept if eng is both else None)
        res[label] = r
        tflops = 2.0 * n_params * r["positions"] / r["wall"] / 1e12
        rep.add(f"[{label}] turns/s ({args.convs} conversations, one segment)", f"{r['turns'] / r['wall']:,.1f}")
        rep.add(f"[{label}] positions computed per second", f"{r['positions'] / r['wall']:,.0f}")
        rep.add(f"[{label}] ms per step: first turn / later turns (mean)",
                f"{1000 * r['first']:,.0f} / {1000 * r['rest']:,.0f}")
        rep.add(f"[{label}] achieved TFLOP/s (2 x params x positions)", f"{tflops:.1f}")
        if peak:
            rep.add(f"[{label}] fraction of {name} dense bf16 peak ({peak:.0f} TFLOP/s)", f"{100 * tflops / peak:.1f}%")
    if cached.prefix_cache is not None:
        rep.add("prefix cache bytes per conversation at the segment's end",
                f"{cached.prefix_cache.bytes / max(1, len(cached.prefix_cache)) / 2**20:,.1f} MiB")
    items = [(st, "which order was charged twice last month") for st in kept["states"].values()]
    q_ms: dict[str, list[float]] = {"uncached": [], "query-ready memory": []}
    log(f"queries: {args.query_reps} passes of {len(items)} (one per conversation), alternating ...")
    for _ in range(args.query_reps):
        for label, eng in (("uncached", plain), ("query-ready memory", both)):
            sync()
            t0 = time.perf_counter()
            eng.embed_queries(items)
            sync()
            q_ms[label].append(1000 * (time.perf_counter() - t0))
    for label, eng in (("uncached", plain), ("query-ready memory", both)):
        qs = eng.last_query_stats
        ms = sorted(q_ms[label])[len(q_ms[label]) // 2]
        rep.add(f"[queries, {label}] queries/s ({len(items)} per pass, median of {args.query_reps})",
                f"{1000 * len(items) / ms:,.1f}")
        rep.add(f"[queries, {label}] positions per query / the query's own tokens",
                f"{qs.positions / max(1, qs.own_tokens):.2f}x")
    rep.add("queries/s, query-ready memory / uncached",
            f"{sorted(q_ms['uncached'])[args.query_reps // 2] / sorted(q_ms['query-ready memory'])[args.query_reps // 2]:.1f}x")
    rep.add("turns/s, prefix cache / uncached",
            f"{(res['prefix cache']['turns'] / res['prefix cache']['wall']) / (res['uncached']['turns'] / res['uncached']['wall']):.2f}x")
    if dev.type == "cuda" and not peak:
        rep.notes.append(f"no bf16 peak known for {name!r} (known: {sorted(BF16_PEAK_TFLOPS)}): pass --peak-tflops")
    rep.notes.append(f"{n_params / 1e6:,.0f}M parameters per position (backbone without embeddings, one LoRA adapter, "
                     "heads); linear-attention layers run transformers' torch reference kernels "
                     "(flash-linear-attention is not installed), so the fraction of peak is a floor.")
    wall = time.perf_counter() - t_start
    table = rep.table()
    print(table)
    for n in rep.notes:
        print("- " + n)
    print(f"(whole run {wall:.0f}s)")
    if not args.no_write:
        cmd = " ".join(["python -m benchmarks.bench_gpu"] + list(argv if argv is not None else sys.argv[1:]))
        update_section(args.out, SECTION, "\n".join([
            f"Command: `.venv/bin/{cmd}` (whole run {wall:.0f} s)", "",
            f"- machine: {machine()}; device {name}",
            f"- date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}", "",
            table, "", *("- " + n for n in rep.notes)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
