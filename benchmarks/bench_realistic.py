"""Realistic-size figures on this machine (issue 10): a random-weight model shaped like Qwen3.5-0.8B.

Builds the `qwen35_08b` shape of workers/tiny_checkpoint.py in memory (hidden 1024, 24 layers,
3 linear-attention : 1 full-attention, LoRA r=64 on both adapters, the real Qwen3.5 tokenizer and
vocabulary; random seeded weights: numbers are about cost and numerical drift, not quality), gives
one conversation a full queue (512 latents; their values do not change the cost), and times, in
float32 and then bfloat16 (the same weights, cast):

- one segment's first turn (its memory row re-reads the 512-latent snapshot) and the following
  turns, which continue from the segment-prefix cache; one later turn also without the cache;
- the prefix cache's bytes per conversation (measured on the entry; the segment maximum follows
  from the measured bytes per position), and how many conversations a budget holds;
- one worker's turns/s over a 16-turn segment = 16 / (first turn + 15 x mean continuing turn),
  for one conversation at a time (no batching: the CPU is busy with one row already);
- bfloat16 against float32: cosine of the same turns' embeddings, and a rerank (candidates read as
  one conversation, a query against the final queue, MODEL_SPEC "rerank") compared by top-5 overlap.

Kept short on purpose (the development machine has 2 shared cores): about 4-5 minutes.
Run:  .venv/bin/python -m benchmarks.bench_realistic            (writes the BENCHMARKS.md section)
      .venv/bin/python -m benchmarks.bench_realistic --size tiny --no-write   (a seconds-long smoke run)
"""

from __future__ import annotations

import argparse
import os
import datetime as _dt
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_engine import Report, log, machine, make_turn
from benchmarks.report import update_section
from schemas.turns import ChatMessage, TurnInput
from workers.engine import EngineConfig, EvoEngine
from workers.state import ConversationState
from workers.tiny_checkpoint import build_tiny_model
from workers.tokenizer import load_qwen_tokenizer

REPO = Path(__file__).resolve().parents[1]
SECTION = "Realistic size on CPU: Qwen3.5-0.8B-shaped, float32 and bfloat16 (issue 10)"

_CANDIDATES = [
    "how do I reset my account password", "the parcel was sent to the wrong address", "refund for a cancelled flight",
    "which train goes to the airport", "my card was charged twice this month", "book a table for dinner on friday",
    "the server returns an error after the upgrade", "garden tips for the winter",
]
_QUERY = "I was charged two times for the same order"


def full_queue_state(engine: EvoEngine, seed: int = 0) -> ConversationState:
    """A conversation whose queue is full (C latents) and whose next turn opens a segment."""
    g = torch.Generator().manual_seed(seed)
    st = engine.new_state()
    # latent_to_mem ends in a ReLU: non-negative latents of a plausible scale
    st.latents = (torch.randn(engine.capacity, engine.hidden_size, generator=g).abs() * 0.5).to(engine.state_dtype)
    st.snapshot_len = engine.capacity
    st.segment_token_ids = []
    st.seq = 99
    return st


def rerank(engine: EvoEngine) -> tuple[np.ndarray, np.ndarray]:
    states: dict[str, ConversationState] = {}
    turns = [TurnInput(conversation_id="rr", seq=i, messages=[ChatMessage(role="user", content=c)])
             for i, c in enumerate(_CANDIDATES)]
    cand = np.stack([o.embedding for t in turns for o in engine.step(states, [t])])
    q = engine.embed_queries([(states["rr"], _QUERY)])[0]
    return cand, q


def run_dtype(engine: EvoEngine, plain: EvoEngine, turns: list[TurnInput], rep: Report, tag: str,
              reps: int = 1) -> dict:
    log(f"[{tag}] warm-up ...")
    engine.step({}, [make_turn(random.Random(9), "warm", 0, (3, 4), (3, 4))])
    engine.prefix_cache.clear()  # type: ignore[union-attr]
    st0 = full_queue_state(engine)
    states = {turns[0].conversation_id: st0.copy()}
    ms, pos, embs = [], [], []
    before_last: ConversationState | None = None
    cache_before_last = None
    cache = engine.prefix_cache
    assert cache is not None
    entry = None  # the largest prefix the segment kept: the last one seen (issue #22 item 5: the
    # segment's 16th turn discards it, as the next turn opens a new segment)
    for k, t in enumerate(turns):
        if k == len(turns) - 1:
            before_last = states[t.conversation_id].copy()
            cache_before_last = engine.prefix_cache.clone()  # type: ignore[union-attr]
        t0 = time.perf_counter()
        out = engine.step(states, [t])[0]
        ms.append(1000 * (time.perf_counter() - t0))
        pos.append(engine.last_stats.real_tokens)
        embs.append(out.embedding)
        entry = cache.peek(t.conversation_id) or entry
        log(f"[{tag}] turn {k + 1} of the segment: {ms[-1]:.0f} ms, {pos[-1]} positions, "
            f"reused {engine.last_stats.reused_positions}")
    if entry is None:
        raise SystemExit("no prefix-cache entry was kept: time at least 2 turns (--turns)")
    cid = turns[-1].conversation_id
    log(f"[{tag}] the last turn again without the prefix cache (and again with it), x{reps} interleaved ...")
    plain_ms: list[float] = []
    last_ms = [ms[-1]]
    for r in range(reps):
        t0 = time.perf_counter()
        out_plain = plain.step({cid: before_last.copy()}, [turns[-1]])[0]  # type: ignore[union-attr]
        plain_ms.append(1000 * (time.perf_counter() - t0))
        if r + 1 < reps:  # the cached side's first sample is the one taken in the segment above
            engine.prefix_cache = cache_before_last.clone()  # type: ignore[union-attr]
            t0 = time.perf_counter()
            engine.step({cid: before_last.copy()}, [turns[-1]])  # type: ignore[union-attr]
            last_ms.append(1000 * (time.perf_counter() - t0))
        log(f"    repetition {r + 1}: uncached {plain_ms[-1]:.0f} ms, cached {last_ms[r]:.0f} ms")
    ms[-1] = statistics.median(last_ms)
    ms_plain = statistics.median(plain_ms)
    pos_plain = plain.last_stats.real_tokens
    agree = float(np.abs(out_plain.embedding - embs[-1]).max())
    log(f"[{tag}] rerank of {len(_CANDIDATES)} candidates ...")
    t0 = time.perf_counter()
    cand, q = rerank(engine)
    ms_rerank = 1000 * (time.perf_counter() - t0)

    n = len(turns)
    cont = statistics.mean(ms[1:])
    per_turn = (ms[0] + 15 * cont) / 16
    fixed = sum(t.numel() * t.element_size() for d in (entry.conv, entry.recurrent) for t in d.values())
    per_pos = (entry.nbytes() - fixed) / max(1, entry.length)
    seg_max = engine.capacity + 2048 + engine.config.segment.max_turns * engine.L
    worst = fixed + per_pos * seg_max
    rep.add(f"[{tag}] segment's first turn (snapshot re-read), ms", f"{ms[0]:,.0f} ({pos[0]:,} positions)")
    rep.add(f"[{tag}] continuing turn{'s 2-' if n > 2 else ' '}{n} with the prefix cache, ms (mean; "
            f"turn {n}: median of {reps})",
            f"{cont:,.0f} ({statistics.mean(pos[1:]):,.0f} positions)")
    rep.add(f"[{tag}] turn {n} without the prefix cache, ms (median of {reps})", f"{ms_plain:,.0f} ({pos_plain:,} positions)")
    rep.add(f"[{tag}] one worker, 1 conversation: ms per turn over a 16-turn segment", f"{per_turn:,.0f}")
    rep.add(f"[{tag}] one worker, 1 conversation: turns/s", f"{1000 / per_turn:.2f}")
    rep.add(f"[{tag}] prefix cache per conversation, measured (prefix of {entry.length} positions)",
            f"{entry.nbytes() / 2**20:,.1f} MiB")
    rep.add(f"[{tag}] prefix cache: fixed (linear-attention states) + per position",
            f"{fixed / 2**20:,.1f} MiB + {per_pos / 1024:,.1f} KiB")
    rep.add(f"[{tag}] prefix cache at a segment's largest row ({seg_max} positions)", f"{worst / 2**20:,.1f} MiB")
    rep.add(f"[{tag}] conversations per GiB of EVOSTREAM_PREFIX_CACHE_MAX_BYTES (measured / worst)",
            f"{2**30 // entry.nbytes()} / {int(2**30 // worst)}")
    rep.add(f"[{tag}] rerank of {len(_CANDIDATES)} candidates + query, ms", f"{ms_rerank:,.0f}")
    rep.notes.append(f"[{tag}] the timed turn {n} with and without the prefix cache: embeddings agree to {agree:.1e}.")
    return {"embs": np.stack(embs), "cand": cand, "q": q, "per_turn_ms": per_turn}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen35_08b", help="workers.tiny_checkpoint SIZES key (qwen3_5 family)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--turns", type=int, default=2, help="turns timed in one segment (the first opens it)")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3,
                    help="the last timed turn with and without the cache, repeated (interleaved); medians")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on this shared 2-core machine a second thread mostly spins)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    cpu_all = time.process_time()
    log(f"building a random {args.size} qwen3_5 model (LoRA r={args.lora_r}) ...")
    t0 = time.perf_counter()
    model = build_tiny_model("qwen3_5", args.size, seed=0, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    tok = load_qwen_tokenizer("qwen3_5")
    build_s = time.perf_counter() - t0
    cfg = model.config.backbone
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.backbone.embed_tokens.weight.numel()
    types = list(model.backbone.config.layer_types)
    desc = (f"random seeded `{args.size}`: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers "
            f"({types.count('linear_attention')} linear-attention, {types.count('full_attention')} full-attention), "
            f"{cfg['num_attention_heads']} q / {cfg['num_key_value_heads']} kv heads of {cfg['head_dim']}, "
            f"delta-net {cfg['linear_num_key_heads']} k / {cfg['linear_num_value_heads']} v heads of "
            f"{cfg['linear_key_head_dim']}, MLP {cfg['intermediate_size']}, vocab {cfg['vocab_size']}; LoRA r={args.lora_r} "
            f"x 2 adapters; {n_params / 1e6:,.0f}M parameters ({(n_params - n_embed) / 1e6:,.0f}M without the "
            f"embedding table); L={model.config.num_latents}, C={model.config.buffer_capacity}; built in {build_s:.0f} s")
    log(desc)
    rng = random.Random(3)
    turns = [make_turn(rng, "real", 100 + k, (10, 20), (15, 25)) for k in range(args.turns)]
    rep = Report()
    results: dict[str, dict] = {}
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
        model.to(dt)  # in place: the bf16 run uses the float32 weights, cast
        cached = EvoEngine(model, tok, config=EngineConfig(prefix_cache_max_bytes=1 << 40))
        plain = EvoEngine(model, tok)
        results[name] = run_dtype(cached, plain, turns, rep, name, args.reps)
    if "float32" in results and "bfloat16" in results:
        a, b = results["float32"], results["bfloat16"]
        cos_turns = (a["embs"] * b["embs"]).sum(1)
        cand_cos = (a["cand"] * b["cand"]).sum(1)
        q_cos = float((a["q"] * b["q"]).sum())
        top = lambda r: set(np.argsort(-(r["cand"] @ r["q"]))[:5].tolist())
        overlap = len(top(a) & top(b))
        rep.add("bf16 vs fp32: cosine of the timed turns' embeddings (min / mean)",
                f"{cos_turns.min():.4f} / {cos_turns.mean():.4f}")
        rep.add("bf16 vs fp32: cosine of the rerank's candidate embeddings (min) and query",
                f"{cand_cos.min():.4f} / {q_cos:.4f}")
        rep.add(f"bf16 vs fp32: top-5 of the rerank ({len(_CANDIDATES)} candidates), shared", f"{overlap} of 5")
        # No bf16/fp32 time ratio here (issue #22): it belongs to the host's CPU, not to the model, and
        # benchmarks/bench_precision.py measures it (with the kernels that ran) for the record.
    wall = time.perf_counter() - t_all
    share = (time.process_time() - cpu_all) / wall
    rep.notes.append(f"contention: this process got {share:.2f} CPU-seconds per wall second over the run "
                     f"({args.threads} torch thread(s); 1.0 = one whole core); load average at the end "
                     f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. Times scale down accordingly on an idle machine.")
    given = list(argv if argv is not None else sys.argv[1:])
    cmd = " ".join(["python -m benchmarks.bench_realistic"] + given)
    table = rep.table()
    print(table)
    for n in rep.notes:
        print("- " + n)
    print(f"(whole run {wall:.0f}s)")
    if not args.no_write:
        body = "\n".join([
            f"Command: `.venv/bin/{cmd}` (whole run {wall:.0f} s)",
            "",
            f"- machine: {machine()}",
            f"- model: {desc}",
            f"- date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            "- one conversation with a full queue (512 latents); turns of 25-45 words; the "
            "first timed turn opens a segment, the others continue it from the prefix cache; torch "
            "reference kernels for the linear-attention layers (no flash-linear-attention on CPU)",
            "",
            table,
            "",
            *("- " + n for n in rep.notes),
        ])
        update_section(args.out, SECTION, body)
        log(f"updated {args.out} section {SECTION!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
