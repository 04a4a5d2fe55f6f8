"""Query-ready memory (issue #22): what a query computes and costs with and without it.

For each `--sizes` entry (a workers.tiny_checkpoint shape of the Qwen3.5 family, random seeded
weights; `qwen35_08b` is shaped like Qwen3.5-0.8B) on the CPU, in ONE run, interleaved:

- `--batch` conversations with a full queue (512 latents) each get one turn through the cached
  engine (prefix cache + query-ready memory), which leaves their queues query-ready;
- a continuing turn of one of them: timed on the plain path (no cache), the prefix cache only
  (before issue #22) and both caches (the ready pass for its new queue included), from the same
  state; positions counted;
- `--queries` single queries (one per pass) against that conversation, cached and uncached,
  alternating; then `--reps` batched passes of `--batch` queries, one per conversation:
  positions per query / the query's own tokens, ms, queries/s, and the largest difference
  between the cached and the uncached embeddings;
- the ready memory's bytes per conversation (how many a GiB of EVOSTREAM_QUERY_CACHE_MAX_BYTES holds).

Then the default configuration's work ratio: an engine configured exactly as a worker with
default settings (stream.cli.core.engine_config(Settings()): both caches `auto`) streams 48 turns
of one conversation on the seeded tiny Qwen3 and Qwen3.5 checkpoints; positions computed over the
full-queue segment (turns 32-47) / the model minimum (bench_engine's `model_minimum`). Positions
do not depend on the hidden size, so the tiny checkpoints give the ratio of every size.

Writes benchmarks/results/query_cache.json and the BENCHMARKS.md section (figures as markers).
Run:   .venv/bin/python -m benchmarks.bench_query_cache                  (~6 min on 2 shared cores)
Smoke: .venv/bin/python -m benchmarks.bench_query_cache --sizes tiny --no-write
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

from benchmarks.bench_engine import log, make_turn, model_minimum, stream_counting
from benchmarks.bench_realistic import full_queue_state
from benchmarks.figures import marker
from benchmarks.report import update_section
from benchmarks.results_schema import (QUERY_CACHE_FILE, RESULTS_DIR, QueryCacheResults, QueryCacheSize, RunInfo,
                                       WorkRatio, write_json)
from workers.engine import EngineConfig, EvoEngine, load_engine
from workers.state import ConversationState
from workers.tiny_checkpoint import build_tiny_model, cached_tiny_checkpoint
from workers.tokenizer import load_qwen_tokenizer

REPO = Path(__file__).resolve().parents[1]
SECTION = "Query-ready memory: queries that compute only their own tokens (issue 22)"
BIG = 1 << 40
QUESTIONS = ["which order was charged twice last month", "where is the parcel I sent on monday",
             "how do I reset the password of my account", "refund for the cancelled flight to lisbon",
             "what did the agent say about the invoice", "is the server error fixed after the upgrade"]


def _ms(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return 1000 * (time.perf_counter() - t0), out


def bench_size(size: str, *, dtype: torch.dtype, n_queries: int, batch: int, reps: int, threads: int,
               turn_reps: int) -> QueryCacheSize:
    log(f"[{size}] building a random qwen3_5 {size} model (LoRA r=64) ...")
    model = build_tiny_model("qwen3_5", size, seed=0, lora_r=64, lora_alpha=128).to(dtype)
    tok = load_qwen_tokenizer("qwen3_5")
    plain = EvoEngine(model, tok)
    prefix_only = EvoEngine(model, tok, config=EngineConfig(prefix_cache_max_bytes=BIG))
    cached = EvoEngine(model, tok, config=EngineConfig(prefix_cache_max_bytes=BIG, query_cache_max_bytes=BIG))
    rng = random.Random(7)
    cids = [f"q{c}" for c in range(batch)]
    states: dict[str, ConversationState] = {c: full_queue_state(cached, seed=k) for k, c in enumerate(cids)}
    log(f"[{size}] {batch} conversations with a full queue: one turn each (opens a segment, makes the queue ready) ...")
    first = [make_turn(rng, c, 100, (10, 20), (15, 25)) for c in cids]
    prefix_states = {c: st.copy() for c, st in states.items()}
    cached.step(states, first)
    prefix_only.step(prefix_states, first[:1])
    cid = cids[0]
    nxt = make_turn(rng, cid, 101, (10, 20), (15, 25))
    before = states[cid].copy()
    log(f"[{size}] a continuing turn: plain, prefix cache only, both caches, x{turn_reps} (interleaved, each from "
        f"the same state and caches) ...")
    query_states = {c: st.copy() for c, st in states.items()}
    p_snap = prefix_only.prefix_cache.clone()  # type: ignore[union-attr]
    c_snap = (cached.prefix_cache.clone(), cached.query_cache.clone())  # type: ignore[union-attr]
    t_plain, t_prefix, t_cached = [], [], []
    for r in range(turn_reps):
        ms, out_plain = _ms(lambda: plain.step({cid: before.copy()}, [nxt])[0])
        t_plain.append(ms)
        pos_plain = plain.last_stats.real_tokens
        prefix_only.prefix_cache = p_snap.clone()
        t_prefix.append(_ms(lambda: prefix_only.step({cid: prefix_states[cid].copy()}, [nxt])[0])[0])
        pos_prefix = prefix_only.last_stats.real_tokens
        cached.prefix_cache, cached.query_cache = c_snap[0].clone(), c_snap[1].clone()
        after = before.copy()
        ms, out_cached = _ms(lambda: cached.step({cid: after}, [nxt])[0])
        t_cached.append(ms)
        pos_cached, ready_pos = cached.last_stats.real_tokens, cached.last_stats.ready_positions
        log(f"    repetition {r + 1}: plain {t_plain[-1]:,.0f} ms, prefix only {t_prefix[-1]:,.0f} ms, "
            f"both {t_cached[-1]:,.0f} ms")
    ms_plain, ms_prefix, ms_cached = (statistics.median(x) for x in (t_plain, t_prefix, t_cached))
    states[cid] = after
    turn_diff = float(np.abs(out_plain.embedding - out_cached.embedding).max())
    # the conversation's ready memory now belongs to its new queue: query the states as they are
    query_states[cid] = states[cid]
    st = query_states[cid]
    log(f"[{size}] {n_queries} single queries, alternating uncached / cached ...")
    single_c, single_u, own, pc, pu, diffs = [], [], [], [], [], []
    for i in range(n_queries):
        q = QUESTIONS[i % len(QUESTIONS)]
        mu, vu = _ms(lambda: plain.embed_queries([(st, q)]))
        pu.append(plain.last_query_stats.positions)
        mc, vc = _ms(lambda: cached.embed_queries([(st, q)]))
        pc.append(cached.last_query_stats.positions)
        own.append(cached.last_query_stats.own_tokens)
        assert cached.last_query_stats.hits == 1, "the query did not read the ready memory"
        single_u.append(mu)
        single_c.append(mc)
        diffs.append(float(np.abs(vu - vc).max()))
        log(f"    query {i + 1}: uncached {mu:,.0f} ms ({pu[-1]} positions), cached {mc:,.0f} ms ({pc[-1]} positions)")
    log(f"[{size}] {reps} batched passes of {batch} queries (one per conversation), alternating ...")
    items = [(query_states[c], QUESTIONS[k % len(QUESTIONS)]) for k, c in enumerate(cids)]
    batch_c, batch_u = [], []
    for r in range(reps):
        mu, vu = _ms(lambda: plain.embed_queries(items))
        mc, vc = _ms(lambda: cached.embed_queries(items))
        batch_u.append(mu)
        batch_c.append(mc)
        diffs.append(float(np.abs(vu - vc).max()))
        log(f"    pass {r + 1}: uncached {mu:,.0f} ms, cached {mc:,.0f} ms ({cached.last_query_stats.hits} hits)")
    entry = cached.query_cache.peek(cid)  # type: ignore[union-attr]
    prefix = cached.prefix_cache.peek(cid)  # type: ignore[union-attr]
    assert entry is not None and prefix is not None
    fixed = sum(t.numel() * t.element_size() for d in (prefix.conv, prefix.recurrent) for t in d.values())
    per_pos = (prefix.nbytes() - fixed) / max(1, prefix.length)
    seg_max = cached.capacity + cached.config.segment.max_tokens + cached.config.segment.max_turns * cached.L
    qms_c, qms_u = statistics.median(single_c), statistics.median(single_u)
    bms_c, bms_u = statistics.median(batch_c), statistics.median(batch_u)
    tokens = statistics.mean(own)
    cfg = model.config.backbone
    return QueryCacheSize(
        model=(f"random seeded qwen3_5 `{size}`: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
               f"LoRA r=64, L={model.config.num_latents}, C={model.config.buffer_capacity}"),
        family="qwen3_5", dtype=str(dtype).removeprefix("torch."), threads=threads,
        queue_len=int(st.queue.shape[0]), ready_point=cached.ready_point(st), query_tokens=tokens,
        positions_per_query_cached=statistics.mean(pc), positions_per_query_uncached=statistics.mean(pu),
        positions_ratio_cached=statistics.mean(pc) / tokens, positions_ratio_uncached=statistics.mean(pu) / tokens,
        query_ms_cached=qms_c, query_ms_uncached=qms_u, single_query_speedup=qms_u / qms_c,
        batch=batch, batch_ms_cached=bms_c, batch_ms_uncached=bms_u,
        queries_per_s_cached=1000 * batch / bms_c, queries_per_s_uncached=1000 * batch / bms_u,
        throughput_ratio=bms_u / bms_c, query_max_diff=max(diffs),
        turn_ms_cached=ms_cached, turn_ms_uncached=ms_plain, turn_ms_prefix_only=ms_prefix,
        turn_positions_cached=pos_cached, turn_positions_uncached=pos_plain, turn_positions_prefix_only=pos_prefix,
        ready_positions=ready_pos, turn_max_diff=turn_diff,
        ready_bytes=entry.nbytes(), conversations_per_gib=2**30 // entry.nbytes(),
        prefix_bytes=prefix.nbytes(), prefix_positions=prefix.length, prefix_fixed_bytes=fixed,
        prefix_bytes_per_position=per_pos, prefix_worst_bytes=fixed + per_pos * seg_max)


def default_work_ratio(family: str, n_turns: int = 48) -> WorkRatio:
    """Positions per full-queue segment / the model minimum, engine configured as a default worker."""
    from stream.cli.core import engine_config
    from stream.settings import Settings

    cfg = engine_config(Settings())
    base = load_engine(cached_tiny_checkpoint(family, "tiny"))
    engine = EvoEngine(base.model, base.tokenizer, config=cfg)
    rng = random.Random(5)
    turns = [make_turn(rng, f"work-{family}", i) for i in range(n_turns)]
    log(f"default configuration, {family}: streaming {n_turns} turns (prefix cache {cfg.prefix_cache_max_bytes:,} B, "
        f"query cache {cfg.query_cache_max_bytes:,} B) ...")
    empty = engine.new_state()
    outs, computed, _ = stream_counting(engine, turns, empty)
    need = model_minimum(engine, turns, outs, empty)
    starts = [i for i, o in enumerate(outs) if o.new_segment] + [n_turns]
    full_from = engine.capacity // engine.L
    a, b = next((x, y) for x, y in zip(starts, starts[1:]) if x >= full_from and y - x == engine.config.segment.max_turns)
    return WorkRatio(family=family, prefix_cache_bytes=cfg.prefix_cache_max_bytes, query_cache_bytes=cfg.query_cache_max_bytes,
                     turns=f"{a}-{b - 1}", minimum=sum(need[a:b]), computed=sum(computed[a:b]),
                     ratio=sum(computed[a:b]) / sum(need[a:b]))


def _fig(data: dict, path: str, fmt: str = "", suffix: str = "") -> str:
    return marker(QUERY_CACHE_FILE, data, path, fmt, suffix)


def section(data: dict) -> str:
    """The BENCHMARKS.md section: every figure a marker rendered from the results file."""
    f = lambda path, fmt="", suffix="": _fig(data, path, fmt, suffix)  # noqa: E731
    lines = [f"Command: `{f('run.command')}` ({f('run.date_utc')})  ",
             f"Host: {f('run.cpu')}; {f('run.machine')} (shared with other engineers' runs)", ""]
    lines += ["| measure | " + " | ".join(f"`{s}`" for s in data["sizes"]) + " |",
              "|---|" + "---|" * len(data["sizes"])]

    def row(label: str, path: str, fmt: str, suffix: str = "") -> str:
        return f"| {label} | " + " | ".join(f(f"sizes.{s}.{path}", fmt, suffix) for s in data["sizes"]) + " |"

    lines += [
        row("compute dtype", "dtype", ""),
        row("torch threads", "threads", "d"),
        row("queue length (ready point)", "queue_len", "d"),
        row("query's own tokens (mean, instruction included)", "query_tokens", ".1f"),
        row("query positions / query tokens, with the query-ready memory (goal <= 1.1x)", "positions_ratio_cached", ".2f", "x"),
        row("query positions / query tokens, without", "positions_ratio_uncached", ".2f", "x"),
        row("one query per pass, ms (median), with", "query_ms_cached", ",.1f"),
        row("one query per pass, ms (median), without", "query_ms_uncached", ",.1f"),
        row("queries/s in passes of one query per conversation, with", "queries_per_s_cached", ",.2f"),
        row("queries/s in passes of one query per conversation, without", "queries_per_s_uncached", ",.2f"),
        row("query throughput, with / without (same run)", "throughput_ratio", ".1f", "x"),
        row("largest |cached - uncached| over the query embeddings", "query_max_diff", ".1e"),
        row("a continuing turn, ms (median): no cache", "turn_ms_uncached", ",.0f"),
        row("a continuing turn, ms: prefix cache only (before this change)", "turn_ms_prefix_only", ",.0f"),
        row("a continuing turn, ms: prefix cache + query-ready memory", "turn_ms_cached", ",.0f"),
        row("its positions: no cache", "turn_positions_uncached", ",d"),
        row("its positions: prefix cache only", "turn_positions_prefix_only", ",d"),
        row("its positions: both caches (the ready pass included)", "turn_positions_cached", ",d"),
        row("query-ready memory per conversation, bytes", "ready_bytes", ",d"),
        row("conversations per GiB of EVOSTREAM_QUERY_CACHE_MAX_BYTES", "conversations_per_gib", ",d"),
        row("segment-prefix cache entry after the continuing turn, bytes", "prefix_bytes", ",d"),
        row("... of which linear-attention states (fixed), bytes", "prefix_fixed_bytes", ",d"),
        row("... per further position, bytes", "prefix_bytes_per_position", ",.0f"),
        row("segment-prefix cache entry at a segment's largest row, bytes", "prefix_worst_bytes", ",.0f"),
    ]
    if data.get("default_work"):
        lines += ["", "The default configuration (both caches `auto`), positions computed over a full-queue "
                  "16-turn segment / the model minimum (goal 1.00x):", ""]
        for fam in data["default_work"]:
            lines.append(f"- {fam}: {_fig(data, f'default_work.{fam}.ratio', '.2f', 'x')} "
                         f"({_fig(data, f'default_work.{fam}.computed', ',d')} of "
                         f"{_fig(data, f'default_work.{fam}.minimum', ',d')} positions, turns "
                         f"{_fig(data, f'default_work.{fam}.turns')})")
    lines += ["", "- Random weights: the figures are about cost and exactness, not retrieval quality. Linear-attention "
              "layers run transformers' torch reference kernels on the CPU (no flash-linear-attention).",
              "- 'With' reads the retriever's keys/values (and, for Qwen3.5, the linear-attention states) over the "
              "queue kept after the last turn (workers/query_cache.py); a Qwen3.5 queue is kept to its 64-position "
              "chunk grid, so positions after the ready point are computed with the query.",
              "- The continuing turn with both caches computes its own tokens for the embedding and pays the ready "
              "pass over its new queue instead; the prefix-only turn re-reads the queue in its embedding pass."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,qwen35_08b", help="workers.tiny_checkpoint SIZES keys (qwen3_5 family)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--queries", type=int, default=4, help="single queries, each timed cached and uncached")
    ap.add_argument("--batch", type=int, default=4, help="conversations (and queries per batched pass)")
    ap.add_argument("--reps", type=int, default=2, help="batched passes, each timed cached and uncached")
    ap.add_argument("--turn-reps", type=int, default=3, help="the continuing turn, timed per path (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-work-ratio", action="store_true", help="skip the default configuration's work ratio")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true", help="print only (no results file, no BENCHMARKS.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = " ".join([".venv/bin/python -m benchmarks.bench_query_cache"] + list(argv if argv is not None else sys.argv[1:]))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    sizes = {s.strip(): bench_size(s.strip(), dtype=dtype, n_queries=args.queries, batch=args.batch, reps=args.reps,
                                   threads=args.threads, turn_reps=args.turn_reps)
             for s in args.sizes.split(",") if s.strip()}
    work = {} if args.no_work_ratio else {fam: default_work_ratio(fam) for fam in ("qwen3", "qwen3_5")}
    res = QueryCacheResults(run=RunInfo.now(cmd), sizes=sizes, default_work=work)
    data = res.model_dump(mode="json")
    text = section(data)
    print(text)
    if not args.no_write:
        log(f"saved {write_json(res, args.results_dir / QUERY_CACHE_FILE)}")
        update_section(REPO / "BENCHMARKS.md", SECTION, text)
        log(f"updated BENCHMARKS.md section {SECTION!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
