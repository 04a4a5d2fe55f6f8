"""Compute precision on CPU (issue #22): is bfloat16 faster than float32 on THIS host, which kernels
ran, and what bfloat16 *storage* does to the numbers, kept apart from bfloat16 *compute*.

On one host, in one run:
- the host: CPU model and flags (AVX512-BF16, AMX), torch's CPU capability, and the oneDNN
  implementation a bf16 matmul runs (oneDNN's own name for it, from its verbose log);
- the start-up probe of `EVOSTREAM_DTYPE=auto` (workers/precision.py): the model's layer-0
  matmuls in float32 and bfloat16, and what it would choose;
- the whole model at `--size` (default: the Qwen3.5-0.8B shape, random seeded weights): a
  continuing turn (prefix cache on) `--reps` times and one query against a full queue, in
  float32 and then in bfloat16 (the same weights, cast); embeddings compared (cosine);
- storage: float32 compute with the latents stored in bfloat16 (EVOSTREAM_STATE_STORAGE_DTYPE),
  `--storage-turns` turns of the tiny Qwen3.5 checkpoint: reloading from the stored bytes after
  every turn vs never reloading (exactness), and against float32 storage (drift).

Writes benchmarks/results/precision.json and the BENCHMARKS.md section (figures as markers).
Run:   .venv/bin/python -m benchmarks.bench_precision                (~5 min on 2 shared cores)
Smoke: .venv/bin/python -m benchmarks.bench_precision --size tiny --no-write
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_engine import log, make_turn
from benchmarks.bench_realistic import full_queue_state
from benchmarks.figures import marker
from benchmarks.report import update_section
from benchmarks.results_schema import PRECISION_FILE, RESULTS_DIR, DtypeTiming, PrecisionResults, RunInfo, write_json
from workers.engine import EngineConfig, EvoEngine, load_engine
from workers.precision import cpu_facts, onednn_matmul_impl, probe_compute_dtype
from workers.state import ConversationState
from workers.tiny_checkpoint import build_tiny_model, cached_tiny_checkpoint
from workers.tokenizer import load_qwen_tokenizer

REPO = Path(__file__).resolve().parents[1]
SECTION = "Compute precision on CPU: bfloat16 vs float32, measured per host (issue 22)"
QUERY = "which order was charged twice last month"


def time_dtype(model, tok, dtype: torch.dtype, reps: int) -> tuple[DtypeTiming, np.ndarray]:
    model.to(dtype)
    engine = EvoEngine(model, tok, config=EngineConfig(prefix_cache_max_bytes=1 << 40, query_cache_max_bytes=1 << 40))
    rng = random.Random(3)
    st = full_queue_state(engine)
    states = {"p": st}
    log(f"[{dtype}] warm-up, then the segment's first turn ...")
    engine.step({"w": full_queue_state(engine, seed=1)}, [make_turn(rng, "w", 100, (3, 4), (3, 4))])
    t0 = time.perf_counter()
    engine.step(states, [make_turn(rng, "p", 100, (10, 20), (15, 25))])
    first_ms = 1000 * (time.perf_counter() - t0)
    log(f"    [{dtype}] first turn: {first_ms:,.0f} ms")
    ms, embs, pos = [], [], 0
    for k in range(reps):
        t = make_turn(rng, "p", 101 + k, (10, 20), (15, 25))
        t0 = time.perf_counter()
        out = engine.step(states, [t])[0]
        ms.append(1000 * (time.perf_counter() - t0))
        pos = engine.last_stats.real_tokens
        embs.append(out.embedding)
        log(f"    [{dtype}] continuing turn {k + 1}: {ms[-1]:,.0f} ms ({pos} positions)")
    t0 = time.perf_counter()
    with engine.scratch():  # no query-ready memory: the query reads the whole queue, like a first query
        q = engine.embed_queries([(states["p"], QUERY)])[0]
    q_ms = 1000 * (time.perf_counter() - t0)
    log(f"    [{dtype}] one query: {q_ms:,.0f} ms")
    seg = (first_ms + 15 * statistics.median(ms)) / 16
    timing = DtypeTiming(dtype=str(dtype).removeprefix("torch."), first_turn_ms=first_ms, turn_ms=statistics.median(ms),
                         turn_ms_all=ms, segment_turn_ms=seg, turns_per_s=1000 / seg, query_ms=q_ms,
                         positions_per_turn=pos)
    return timing, np.stack(embs + [q])


def storage(turns: int) -> tuple[float, float, bool]:
    """bf16 storage, fp32 compute: (reload-every-turn vs never, max |diff|; min cosine vs fp32
    storage; in-memory == read back)."""
    engine = load_engine(cached_tiny_checkpoint("qwen3_5", "tiny"))
    rng = random.Random(11)
    plan = [make_turn(rng, "s", k) for k in range(turns)]

    def fresh(storage_dtype: torch.dtype | None) -> ConversationState:
        st = engine.new_state()
        st.storage_dtype = storage_dtype
        return st

    def stored_and_back(st: ConversationState) -> ConversationState:
        # what the store writes (stream/state/store.py _state_bytes) and reads back (widened)
        raw = ConversationState(hidden_size=st.hidden_size, capacity=st.capacity, dtype=torch.bfloat16,
                                latents=st.latents.to(torch.bfloat16), snapshot_len=st.snapshot_len,
                                segment_token_ids=st.segment_token_ids, seq=st.seq).to_bytes()
        back = ConversationState.from_bytes(raw)
        back.latents, back.dtype, back.storage_dtype = back.latents.to(torch.float32), torch.float32, torch.bfloat16
        return back

    never, reload, fp32 = {"s": fresh(torch.bfloat16)}, {"s": fresh(torch.bfloat16)}, {"s": fresh(None)}
    diff, cos, exact = 0.0, 1.0, True
    for t in plan:
        a = engine.step(never, [t])[0].embedding
        b = engine.step(reload, [t])[0].embedding
        back = stored_and_back(reload["s"])
        exact &= bool(torch.equal(back.latents, reload["s"].latents))
        reload["s"] = back
        c = engine.step(fp32, [t])[0].embedding
        diff = max(diff, float(np.abs(a - b).max()))
        cos = min(cos, float(np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c))))
    return diff, cos, exact


def _fig(data: dict, path: str, fmt: str = "", suffix: str = "") -> str:
    return marker(PRECISION_FILE, data, path, fmt, suffix)


def section(data: dict) -> str:
    f = lambda path, fmt="", suffix="": _fig(data, path, fmt, suffix)  # noqa: E731
    dts = list(data["timings"])
    lines = [
        f"Command: `{f('run.command')}` ({f('run.date_utc')})  ",
        f"Host: {f('run.cpu')}; {f('run.machine')} (shared with other engineers' runs)  ",
        f"Model: {f('model')}", "",
        f"Kernel path: torch CPU capability {f('torch_capability')}; a bf16 matmul ran oneDNN's "
        f"`{f('onednn_bf16_matmul')}` (float32 matmuls run the BLAS). The start-up probe of `EVOSTREAM_DTYPE=auto` "
        f"timed the model's layer-0 matmuls at {f('probe_fp32_ms', '.1f', 'ms')} float32 and "
        f"{f('probe_bf16_ms', '.1f', 'ms')} bfloat16 ({f('probe_ratio', '.2f', 'x')}) and would choose "
        f"**{f('probe_choice')}** on this host.", "",
        "| measure | " + " | ".join(dts) + " |", "|---|" + "---|" * len(dts),
        "| a segment's first turn (re-reads the snapshot), ms | " + " | ".join(f(f"timings.{d}.first_turn_ms", ",.0f") for d in dts) + " |",
        "| a continuing turn, ms (median) | " + " | ".join(f(f"timings.{d}.turn_ms", ",.0f") for d in dts) + " |",
        "| ms per turn over a 16-turn segment | " + " | ".join(f(f"timings.{d}.segment_turn_ms", ",.0f") for d in dts) + " |",
        "| one worker, one conversation: turns/s | " + " | ".join(f(f"timings.{d}.turns_per_s", ".3f") for d in dts) + " |",
        "| its positions | " + " | ".join(f(f"timings.{d}.positions_per_turn", ",d") for d in dts) + " |",
        "| one query against a full queue, ms | " + " | ".join(f(f"timings.{d}.query_ms", ",.0f") for d in dts) + " |",
        "",
        f"- Faster on this host: **{f('faster')}**. bfloat16 / float32 time: a continuing turn "
        f"{f('bf16_over_fp32_turn', '.2f', 'x')}, a query "
        f"{f('bf16_over_fp32_query', '.2f', 'x')} (below 1: bfloat16 is faster here). The figure is the host's, "
        "not the model's: it follows the CPU's bf16 instructions (AMX tiles run bf16 matmuls natively, "
        "AVX512-BF16 only has dot products), so measure on yours: this command, or `EVOSTREAM_DTYPE=auto`.",
        f"- bfloat16 compute against float32 compute (random weights): cosine of the timed turns' and the "
        f"query's embeddings >= {f('bf16_compute_cosine_min', '.4f')}.",
        f"- bfloat16 *storage* with float32 compute ({f('storage_turns', 'd')} turns, tiny Qwen3.5): latents read "
        f"back from the stored bytes equal the in-memory ones: {f('storage_roundtrip_exact')}; reloading after "
        f"every turn changes the embeddings by {f('storage_reload_max_diff', '.1e')} (each turn's latents are "
        f"rounded as they are applied); against float32 storage, cosine >= {f('storage_cosine_min', '.6f')}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen35_08b", help="workers.tiny_checkpoint SIZES key (qwen3_5 family)")
    ap.add_argument("--reps", type=int, default=3, help="continuing turns timed per dtype")
    ap.add_argument("--storage-turns", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = " ".join([".venv/bin/python -m benchmarks.bench_precision"] + list(argv if argv is not None else sys.argv[1:]))
    facts = cpu_facts()
    log(f"host: {facts.describe()}")
    log(f"building a random qwen3_5 {args.size} model (LoRA r=64) ...")
    model = build_tiny_model("qwen3_5", args.size, seed=0, lora_r=64, lora_alpha=128)
    tok = load_qwen_tokenizer("qwen3_5")
    probe = probe_compute_dtype(model)
    log(probe.describe())
    timings, embs = {}, {}
    for dt in (torch.float32, torch.bfloat16):  # float32 first: the bf16 run casts the same weights
        t, e = time_dtype(model, tok, dt, args.reps)
        timings[t.dtype], embs[t.dtype] = t, e
    a, b = embs["float32"], embs["bfloat16"]
    cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
    log(f"storage: {args.storage_turns} turns, bfloat16 storage with float32 compute ...")
    diff, scos, exact = storage(args.storage_turns)
    cfg = model.config.backbone
    res = PrecisionResults(
        run=RunInfo.now(cmd),
        model=(f"random seeded qwen3_5 `{args.size}` (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
               f"LoRA r=64), {args.threads} torch thread(s)"),
        params=sum(p.numel() for p in model.parameters()), torch_capability=facts.torch_capability, cpu_flags=list(facts.flags),
        onednn_bf16_matmul=onednn_matmul_impl(torch.bfloat16) or "none (not oneDNN)",
        probe_fp32_ms=probe.float32_ms or 0.0, probe_bf16_ms=probe.bfloat16_ms or 0.0, probe_ratio=probe.ratio or 0.0,
        probe_choice=probe.chosen, timings=timings,
        bf16_over_fp32_turn=timings["bfloat16"].turn_ms / timings["float32"].turn_ms,
        bf16_over_fp32_query=timings["bfloat16"].query_ms / timings["float32"].query_ms,
        faster=min(timings.values(), key=lambda t: t.segment_turn_ms).dtype,
        bf16_compute_cosine_min=cos, storage_turns=args.storage_turns, storage_reload_max_diff=diff,
        storage_cosine_min=scos, storage_roundtrip_exact=exact)
    data = res.model_dump(mode="json")
    text = section(data)
    print(text)
    if not args.no_write:
        log(f"saved {write_json(res, args.results_dir / PRECISION_FILE)}")
        update_section(REPO / "BENCHMARKS.md", SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
