"""Engine benchmark: is the streaming engine incremental, batched, and cheap to checkpoint?

Measures, in ONE run on this machine (CPU by default, seeded tiny checkpoint, Qwen3 family):

(a) cost of turn 10 vs turn 500 of one conversation
    - incremental: `engine.step` on the live state (median of several repetitions, each on a
      copy of the state before that turn);
    - re-reading the history as the reference does: `reference.build_memory` over turns 0..N
      (memory rebuilt from scratch, one pass per segment) + `reference.embed_against` for turn N.
      (`reference.run_conversation` would also re-embed every earlier turn: costlier still.)
    Reported: the ratio turn500 / turn10 for both. Target: incremental within 1.3x.
(b) turns/s stepping 64 conversations one at a time (64 step calls of one turn) vs batched
    (one step call with the 64 turns), same turns and states, several repetitions; run for
    new conversations (their first turn) and for conversations with 8 turns of history
    (`--histories 0,8`). Target: batched >= 5x.
(c) bytes written per turn once the queue is full (> 32 turns): `StateDelta.to_bytes()` vs
    `ConversationState.to_bytes()`. Target: >= 20x fewer.

GPU mode (`--gpu on`, or automatically when `torch.cuda.is_available()`): (b) again with a
"bench1024" checkpoint (hidden 1024, 24 layers) in bfloat16 on the GPU, reporting tokens/s and
the fraction of the device's dense bf16 peak, counting 2 x (backbone params without the
embedding table + one adapter's LoRA params + heads) FLOPs per token plus the causal attention
term. On a machine without CUDA this is skipped with a message.

Run:  .venv/bin/python -m benchmarks.bench_engine   (or `make bench-engine`; about 2-3 min on 2 cores)
      .venv/bin/python -m benchmarks.bench_engine --size small  (hidden 256)
Prints a table with PASS/MISS per target and writes/updates the "Engine" section of
BENCHMARKS.md with the command, the machine and the numbers. Progress goes to stderr.
Saves the series behind the plots (issue 11) under benchmarks/results/: engine_history.json
((a): every streamed step, the timed turns; `--history-points` adds timed turns) and
engine_prefix_cache.json ((d): ms and positions by position in a segment, with and without the
prefix cache); `python -m benchmarks.plots` draws them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import update_section
from benchmarks.results_schema import (ENGINE_HISTORY_FILE, ENGINE_PREFIX_CACHE_FILE, RESULTS_DIR, EngineHistory,
                                       PrefixCacheSegment, RunInfo, TimedTurn, write_json)
from schemas.turns import ChatMessage, TurnInput
from workers import reference
from workers.engine import EngineConfig, EvoEngine, load_engine
from workers.state import ConversationState
from workers.tiny_checkpoint import cached_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SECTION = "Engine: incremental, batched, delta checkpoints"
SECTION_CACHE = "Engine: segment-prefix cache, work per turn (issue 10)"

TARGET_INCREMENTAL_RATIO = 1.3
TARGET_BATCH_SPEEDUP = 5.0
TARGET_DELTA_RATIO = 20.0

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment; --peak-tflops overrides
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}

_WORDS = (
    "order refund shipping invoice password account delivery parcel customs charge card subscription "
    "plan upgrade error reset schedule flight booking seat bag the a to of and in is it you that for on "
    "with as be at this have from or by we can your when how which time will about memory weekend "
    "garden dinner recipe train ticket hotel meeting report budget python server database"
).split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_turn(rng: random.Random, cid: str, seq: int, user_words: tuple[int, int] = (8, 30),
              assistant_words: tuple[int, int] = (10, 45)) -> TurnInput:
    u = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*user_words)))
    a = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*assistant_words)))
    return TurnInput(conversation_id=cid, seq=seq, messages=[ChatMessage(role="user", content=u),
                                                             ChatMessage(role="assistant", content=a)])


def median_ms(xs: list[float]) -> float:
    return 1000.0 * statistics.median(xs)


@dataclass
class Row:
    measure: str
    value: str
    target: str = ""
    result: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts: list[tuple[str, bool]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # free lines printed after the table (e.g. the work-ratio lines)

    def add(self, measure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        res = "" if ok is None else ("PASS" if ok else "MISS")
        self.rows.append(Row(measure, value, target, res))
        if ok is not None:
            self.verdicts.append((measure, ok))

    def table(self) -> str:
        head = ["measure", "value", "target", "result"]
        cells = [head] + [[r.measure, r.value, r.target, r.result] for r in self.rows]
        w = [max(len(c[i]) for c in cells) for i in range(4)]
        line = lambda c: "| " + " | ".join(c[i].ljust(w[i]) for i in range(4)) + " |"
        return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(c) for c in cells[1:]])


# --------------------------------------------------------------------------------------------
# (a) + (c): one long conversation
# --------------------------------------------------------------------------------------------
def bench_long_conversation(engine: EvoEngine, rep: Report, *, n_turns: int, early: int, reps_inc: int,
                            reps_ref: int, reps_seg: int, history_points: tuple[int, ...] = ()) -> dict:
    """(a) and (c). Returns the raw series for the plots (issue 11): the time of every step
    while streaming, and the medians at each timed turn (`early`, the last turn, and any of
    `history_points`), incremental and re-read."""
    late = n_turns - 1
    timed = sorted({early, late} | {p for p in history_points if 0 <= p < late})
    rng = random.Random(1)
    cid = "long"
    turns = [make_turn(rng, cid, i) for i in range(n_turns)]
    mem_ids = [engine.renderer.memory_ids(t) for t in turns]
    emb_ids = [engine.renderer.embedding_ids(t) for t in turns]
    C, L = engine.capacity, engine.L
    seg = engine.config.segment.max_turns
    full_queue_from = C // L  # turns after which the queue is full
    # three windows of one whole segment each: the first (queue filling), the first one that
    # starts with a full queue, and the last complete one before the timed late turn
    windows = {"first": 0, "full": -(-full_queue_from // seg) * seg, "last": (late - seg) // seg * seg}
    windows = {k: w for k, w in windows.items() if 0 <= w and w + seg <= late}  # short runs: fewer windows
    keep = set(timed) | {w + k for w in windows.values() for k in range(seg)}

    states = {cid: engine.new_state()}
    before: dict[int, ConversationState] = {}
    opens: list[bool] = []
    delta_bytes: list[int] = []
    full_bytes: list[int] = []
    streamed_ms: list[float] = []  # for the plots: one timing per turn, history growing
    t_start = time.perf_counter()
    log(f"(a) streaming {late} turns of one conversation (state kept, one step per turn) ...")
    for i, t in enumerate(turns[:late]):
        if i in keep:
            before[i] = states[cid].copy()
        t0 = time.perf_counter()
        out = engine.step(states, [t])[0]
        streamed_ms.append(1000.0 * (time.perf_counter() - t0))
        opens.append(out.new_segment)
        if i >= full_queue_from:
            delta_bytes.append(len(out.delta.to_bytes()))
            full_bytes.append(len(states[cid].to_bytes()))
        if (i + 1) % 50 == 0:
            el = time.perf_counter() - t_start
            log(f"    turn {i + 1}/{late}  {el:6.1f}s elapsed, ~{el / (i + 1) * (late - i - 1):5.1f}s to go")
    before[late] = states[cid].copy()
    aligned = all(opens[w] and not any(opens[w + 1: w + seg]) and (w + seg >= len(opens) or opens[w + seg])
                  for w in windows.values())

    positions: dict[int, int] = {}

    def incremental(n: int) -> tuple[float, np.ndarray]:
        st = {cid: before[n].copy()}
        t0 = time.perf_counter()
        out = engine.step(st, [turns[n]])[0]
        dt = time.perf_counter() - t0
        positions[n] = engine.last_stats.real_tokens
        return dt, out.embedding

    def reread(n: int) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        raw, ends, _ = reference.build_memory(engine.model, mem_ids[: n + 1])
        end = ends[n]
        window = None if end == 0 else raw[max(0, end - C): end]
        emb = reference.embed_against(engine.model, [emb_ids[n]], [window])[0]
        return time.perf_counter() - t0, emb

    log(f"(a) timing turns {timed}: incremental x{reps_inc}, re-read x{reps_ref} (interleaved) ...")
    inc: dict[int, list[float]] = {n: [] for n in timed}
    ref: dict[int, list[float]] = {n: [] for n in timed}
    parity = 0.0
    last_inc: dict[int, np.ndarray] = {}
    for r in range(max(reps_inc, reps_ref)):
        for n in timed:
            if r < reps_inc or n not in last_inc:
                dt, last_inc[n] = incremental(n)
                inc[n].append(dt)
            if r < reps_ref:
                dt, e_ref = reread(n)
                ref[n].append(dt)
                parity = max(parity, float(np.abs(last_inc[n] - e_ref).max()))
        log(f"    repetition {r + 1} done")

    log(f"(a) timing every turn of three whole segments {sorted(windows.values())}, x{reps_seg} (interleaved) ...")
    per_turn: dict[int, list[float]] = {w + k: [] for w in windows.values() for k in range(seg)}
    for r in range(reps_seg):
        for k in range(seg):
            for w in windows.values():
                per_turn[w + k].append(incremental(w + k)[0])
    seg_ms = {name: 1000.0 * statistics.mean(statistics.median(per_turn[w + k]) for k in range(seg))
              for name, w in windows.items()}

    inc_ratio = statistics.median(inc[late]) / statistics.median(inc[early])
    ref_ratio = statistics.median(ref[late]) / statistics.median(ref[early])
    rep.add(f"(a) incremental step, turn {early} (median of {reps_inc})", f"{median_ms(inc[early]):.1f} ms")
    rep.add(f"(a) incremental step, turn {late} (median of {reps_inc})", f"{median_ms(inc[late]):.1f} ms")
    rep.add(f"(a) incremental turn{late}/turn{early}", f"{inc_ratio:.2f}x", f"<= {TARGET_INCREMENTAL_RATIO}x",
            inc_ratio <= TARGET_INCREMENTAL_RATIO)
    rep.add(f"(a) reference re-read, turn {early} (median of {reps_ref})", f"{median_ms(ref[early]):.1f} ms")
    rep.add(f"(a) reference re-read, turn {late} (median of {reps_ref})", f"{median_ms(ref[late]):.1f} ms")
    rep.add(f"(a) reference re-read turn{late}/turn{early}", f"{ref_ratio:.2f}x", "(grows with history)")
    rep.add(f"(a) turn {late}: re-read / incremental",
            f"{statistics.median(ref[late]) / statistics.median(inc[late]):.1f}x")
    for name in ("first", "full", "last"):
        if name in windows:
            w = windows[name]
            label = "queue full" if w >= full_queue_from else "queue filling"
            rep.add(f"(a) incremental, mean over turns {w}-{w + seg - 1} ({label})", f"{seg_ms[name]:.1f} ms/turn")
    if "full" in windows and "last" in windows and windows["last"] > windows["full"]:
        rep.add(f"(a) incremental, turns {windows['last']}-{windows['last'] + seg - 1} / "
                f"{windows['full']}-{windows['full'] + seg - 1}", f"{seg_ms['last'] / seg_ms['full']:.2f}x",
                "(flat once the queue is full)")
    rep.notes.append(
        f"(a) turn {early} is turn {early % seg + 1} of its segment and is embedded against "
        f"{min(early, full_queue_from) * L} latents; turn {late} is turn {late % seg + 1} of its segment, "
        f"against {C} latents (queue full). Incremental and re-read embeddings of the timed turns agree to "
        f"{parity:.1e}. Segment windows of {seg} turns: {windows}"
        + ("" if aligned else " (NOT aligned with the segments of this conversation)") + "; each turn's time is "
        f"the median of {reps_seg}, then averaged over the window.")
    if inc_ratio > TARGET_INCREMENTAL_RATIO:
        rep.notes.append(
            f"(a) why the turn {late}/turn {early} ratio exceeds {TARGET_INCREMENTAL_RATIO}: the two steps run "
            f"{positions[late]} vs {positions[early]} positions ({positions[late] / positions[early]:.2f}x). "
            f"Turn {early} is embedded against a queue of {min(early, full_queue_from) * L} latents and its segment "
            f"has no memory prefix; turn {late} is embedded against the full queue of {C}, as the model defines it. "
            "That growth stops when the queue is full (turn "
            f"{full_queue_from}): compare the segment windows above.")

    # (c)
    d, f = statistics.mean(delta_bytes), statistics.mean(full_bytes)
    ratio = f / d
    worst = min(fb / db for fb, db in zip(full_bytes, delta_bytes))
    rep.add(f"(c) delta bytes per turn (mean, turns {full_queue_from + 1}-{late})", f"{d:,.0f} B")
    rep.add("(c) full state bytes per turn (mean, same turns)", f"{f:,.0f} B")
    rep.add("(c) full / delta", f"{ratio:.1f}x (worst turn {worst:.1f}x)", f">= {TARGET_DELTA_RATIO:.0f}x",
            ratio >= TARGET_DELTA_RATIO)
    return {
        "segment_turns": seg, "queue_full_from_turn": full_queue_from, "streamed_ms": streamed_ms,
        "incremental": [TimedTurn(turn=n, ms=median_ms(inc[n]), reps=len(inc[n])) for n in timed],
        "reread": [TimedTurn(turn=n, ms=median_ms(ref[n]), reps=len(ref[n])) for n in timed if ref[n]],
        "windows": [TimedTurn(turn=n, ms=median_ms(v), reps=len(v)) for n, v in sorted(per_turn.items())],
    }


# --------------------------------------------------------------------------------------------
# (b): 64 conversations, one at a time vs batched
# --------------------------------------------------------------------------------------------
def build_conversations(engine: EvoEngine, n_conv: int, history: int, seed: int = 2):
    rng = random.Random(seed)
    states: dict[str, ConversationState] = {}
    hist = [[make_turn(rng, f"c{c:03d}", s) for s in range(history)] for c in range(n_conv)]
    for s in range(history):  # warm the memories, batched
        engine.step(states, [h[s] for h in hist])
    nxt = [make_turn(rng, f"c{c:03d}", history) for c in range(n_conv)]
    return states, nxt


def bench_batching(engine: EvoEngine, rep: Report, *, n_conv: int, history: int, reps: int,
                   label: str = "(b)", sync=lambda: None) -> dict[str, float]:
    log(f"{label} {n_conv} conversations with {history} turns of history; timing turn {history + 1} "
        f"one at a time vs batched, x{reps} (interleaved) ...")
    states, turns = build_conversations(engine, n_conv, history)
    # with a prefix cache, both ways start from the cache the history left (entries are shared,
    # never mutated: cloning is cheap)
    snapshot = engine.prefix_cache.clone() if engine.prefix_cache is not None else None

    def fresh_cache() -> None:
        if snapshot is not None:
            engine.prefix_cache = snapshot.clone()

    seq_s: list[float] = []
    bat_s: list[float] = []
    tokens = 0
    diff = 0.0
    for r in range(reps):
        st = {k: v.copy() for k, v in states.items()}
        fresh_cache()
        sync()
        t0 = time.perf_counter()
        one = [engine.step(st, [t])[0] for t in turns]
        sync()
        seq_s.append(time.perf_counter() - t0)
        st = {k: v.copy() for k, v in states.items()}
        fresh_cache()
        sync()
        t0 = time.perf_counter()
        many = engine.step(st, turns)
        sync()
        bat_s.append(time.perf_counter() - t0)
        tokens = engine.last_stats.real_tokens
        diff = max(diff, max(float(np.abs(a.embedding - b.embedding).max()) for a, b in zip(one, many)))
        log(f"    repetition {r + 1}: one at a time {seq_s[-1]:.2f}s, batched {bat_s[-1]:.2f}s")
    seq_tps = n_conv / statistics.median(seq_s)
    bat_tps = n_conv / statistics.median(bat_s)
    speedup = bat_tps / seq_tps
    tok_per_turn = tokens / n_conv
    rep.add(f"{label} one at a time, {n_conv} step calls (median of {reps})",
            f"{seq_tps:,.1f} turns/s ({seq_tps * tok_per_turn:,.0f} tok/s)")
    rep.add(f"{label} batched, 1 step call of {n_conv} turns (median of {reps})",
            f"{bat_tps:,.1f} turns/s ({bat_tps * tok_per_turn:,.0f} tok/s)")
    rep.add(f"{label} batched / one at a time", f"{speedup:.1f}x", f">= {TARGET_BATCH_SPEEDUP:.0f}x",
            speedup >= TARGET_BATCH_SPEEDUP)
    rep.notes.append(f"{label}: {n_conv} conversations with {history} turns of history each, timing their turn "
                     f"{history + 1}; batched and one-at-a-time embeddings agree to {diff:.1e}; the batched step "
                     f"ran {engine.last_stats.passes} forward passes over {tokens:,} real tokens "
                     f"({engine.last_stats.padded_tokens:,} with padding; tok/s counts real tokens of both "
                     f"adapters' passes).")
    if speedup < TARGET_BATCH_SPEEDUP and engine.model.device.type == "cpu":
        rows = [r for a, r, _ in engine.last_stats.per_pass if a == "memory_generator"]
        avg = tokens / max(1, 2 * n_conv)
        rep.notes.append(
            f"{label} why below {TARGET_BATCH_SPEEDUP:.0f}x here: both ways run the same {tokens:,} positions "
            f"(batched adds {engine.last_stats.padded_tokens - tokens:,} of padding, {sum(rows)} memory rows in "
            f"{len(rows)} passes); on a CPU at hidden {engine.hidden_size} the cost is per position (rows of "
            f"~{avg:,.0f} positions), so batching only saves the per-call overhead: "
            f"{1000 * statistics.median(seq_s) / n_conv:.1f} ms/turn one at a time vs "
            f"{1000 * statistics.median(bat_s) / n_conv:.1f} ms/turn batched (rows are right-padded without a "
            f"mask, runner padding='{engine.runner.padding}', so attention stays on its fused causal kernel; "
            "the reference's masked left padding takes the slower masked path). Batching pays where one row leaves "
            "the device idle: a GPU (GPU mode below); on CPU what cuts the cost is computing fewer positions: "
            + ("the segment-prefix cache of (d), used here." if engine.prefix_cache is not None else
               "the segment-prefix cache of (d) (row '(b, prefix cache)'; without it each memory step re-reads "
               "its open segment)."))
    return {"batched_s": statistics.median(bat_s), "tokens": float(tokens),
            "padded_tokens": float(engine.last_stats.padded_tokens), "speedup": speedup}


# --------------------------------------------------------------------------------------------
# (d): the segment-prefix cache (issue 10): work per turn against the model's minimum
# --------------------------------------------------------------------------------------------
TARGET_WORK_RATIO = 1.15


def model_minimum(engine: EvoEngine, turns: list[TurnInput], outs, first_state: ConversationState) -> list[int]:
    """Positions the model needs per turn (MODEL_SPEC): the embedding pass (queue window + the
    turn's embedding tokens) plus the turn's share of the reference's one memory pass per segment
    (the snapshot once, at the segment's first turn, then each turn's memory tokens + L slots)."""
    need = []
    queue_len = first_state.memory_len
    for t, o in zip(turns, outs):
        n = o.memory_len + len(engine.renderer.embedding_ids(t))
        n += len(engine.renderer.memory_ids(t)) + engine.L
        if o.new_segment:
            n += queue_len  # the snapshot: the queue as this segment opens
        need.append(n)
        queue_len = min(engine.capacity, queue_len + engine.L)
    return need


def stream_counting(engine: EvoEngine, turns: list[TurnInput], state: ConversationState):
    states = {turns[0].conversation_id: state.copy()}
    outs, computed, ms = [], [], []
    for t in turns:
        t0 = time.perf_counter()
        outs.append(engine.step(states, [t])[0])
        ms.append(time.perf_counter() - t0)
        computed.append(engine.last_stats.real_tokens)
    return outs, computed, ms


def bench_prefix_cache(rep: Report, *, family: str, size: str, n_turns: int, reps: int, timing: bool) -> dict | None:
    """Work ratio (positions computed / model minimum) per 16-turn segment for the uncached and
    the cached path, and (when `timing`) ms per turn by position in a full-queue segment; then
    returns that segment's series for the plots (issue 11)."""
    plain = load_engine(cached_tiny_checkpoint(family, size))
    cached = EvoEngine(plain.model, plain.tokenizer, config=EngineConfig(prefix_cache_max_bytes=1 << 40))
    rng = random.Random(5)
    cid = f"work-{family}"
    turns = [make_turn(rng, cid, i) for i in range(n_turns)]
    seg = plain.config.segment.max_turns
    log(f"(d) {family}: streaming {n_turns} turns without and with the prefix cache (positions counted) ...")
    empty = plain.new_state()
    outs_p, comp_p, _ = stream_counting(plain, turns, empty)
    outs_c, comp_c, _ = stream_counting(cached, turns, empty)
    need = model_minimum(plain, turns, outs_p, empty)
    agree = max(float(np.abs(a.embedding - b.embedding).max()) for a, b in zip(outs_p, outs_c))
    starts = [i for i, o in enumerate(outs_p) if o.new_segment] + [n_turns]
    segs = [(a, b) for a, b in zip(starts, starts[1:]) if b - a == seg]
    full_from = plain.capacity // plain.L
    steady = [s for s in segs if s[0] >= full_from] or segs
    a, b = steady[0]
    r_plain = sum(comp_p[a:b]) / sum(need[a:b])
    r_cached = sum(comp_c[a:b]) / sum(need[a:b])
    label = f"turns {a}-{b - 1}, queue {'full' if a >= full_from else 'filling'}"
    rep.add(f"(d) {family}: work ratio, uncached path ({label})", f"{r_plain:.2f}x")
    rep.add(f"(d) {family}: work ratio, prefix cache ({label})", f"{r_cached:.2f}x", f"<= {TARGET_WORK_RATIO}x",
            r_cached <= TARGET_WORK_RATIO)
    first = segs[0]
    rp0 = sum(comp_p[first[0]:first[1]]) / sum(need[first[0]:first[1]])
    rc0 = sum(comp_c[first[0]:first[1]]) / sum(need[first[0]:first[1]])
    rep.lines.append(f"work ratio (positions computed / model minimum, mean over a segment): {r_plain:.2f}x "
                     f"(today's path, {family}, {label})")
    rep.lines.append(f"work ratio (positions computed / model minimum, mean over a segment): {r_cached:.2f}x "
                     f"(prefix cache, {family}, {label})")
    rep.notes.append(
        f"(d) {family}: {n_turns} turns of one conversation, segments of {seg} turns; the model minimum of a "
        f"segment is {sum(need[a:b]):,} positions ({label}); the uncached path computed {sum(comp_p[a:b]):,}, the "
        f"cached one {sum(comp_c[a:b]):,}. First segment (turns {first[0]}-{first[1] - 1}, queue filling): "
        f"{rp0:.2f}x uncached, {rc0:.2f}x cached. Embeddings with and without the cache agree to {agree:.1e}."
        + (" Qwen3.5 keeps its prefix to a multiple of 64 positions and recomputes the rest (under 64 per turn),"
           " so that its linear-attention kernel sees the chunks of an uncached pass (workers/prefix_pass.py)."
           if family == "qwen3_5" else ""))
    if r_cached > TARGET_WORK_RATIO:
        rep.notes.append(f"(d) {family}: above {TARGET_WORK_RATIO}x: see the positions above.")
    if not timing:
        return None
    # ms per turn by position in a full-queue segment, both paths from the same state
    states = {cid: plain.new_state()}
    for t in turns[:a]:
        plain.step(states, [t])
    start = states[cid]
    log(f"(d) {family}: timing every turn of segment {a}-{b - 1}, uncached and cached, x{reps} (interleaved) ...")
    ms_p: list[list[float]] = [[] for _ in range(b - a)]
    ms_c: list[list[float]] = [[] for _ in range(b - a)]
    for r in range(reps):
        _, _, mp = stream_counting(plain, turns[a:b], start)
        cached.prefix_cache.clear()  # type: ignore[union-attr]
        _, _, mc = stream_counting(cached, turns[a:b], start)
        for k in range(b - a):
            ms_p[k].append(mp[k])
            ms_c[k].append(mc[k])
        log(f"    repetition {r + 1}: {1000 * sum(mp):.0f} ms uncached, {1000 * sum(mc):.0f} ms cached")
    med_p = [median_ms(x) for x in ms_p]
    med_c = [median_ms(x) for x in ms_c]
    rep.lines.append("")
    rep.lines.append(f"ms per turn by position in the segment ({family}, turns {a}-{b - 1}, queue full, median of {reps}):")
    rep.lines.append("")
    rep.lines.append("| position | " + " | ".join(str(k + 1) for k in range(b - a)) + " |")
    rep.lines.append("|---|" + "---|" * (b - a))
    rep.lines.append("| uncached | " + " | ".join(f"{x:.1f}" for x in med_p) + " |")
    rep.lines.append("| prefix cache | " + " | ".join(f"{x:.1f}" for x in med_c) + " |")
    rep.add(f"(d) {family}: uncached ms per turn, position {b - a} / position 2", f"{med_p[-1] / med_p[1]:.2f}x")
    rep.add(f"(d) {family}: prefix cache ms per turn, position {b - a} / position 2", f"{med_c[-1] / med_c[1]:.2f}x",
            "(flat)")
    rep.add(f"(d) {family}: mean ms per turn over the segment, uncached / cached",
            f"{statistics.mean(med_p):.1f} / {statistics.mean(med_c):.1f}")
    return {"family": family, "first_turn": a, "queue_full": a >= full_from, "reps": reps,
            "uncached_ms": med_p, "cached_ms": med_c, "uncached_positions": comp_p[a:b],
            "cached_positions": comp_c[a:b], "minimum_positions": need[a:b]}


# --------------------------------------------------------------------------------------------
# GPU mode
# --------------------------------------------------------------------------------------------
def flop_params(engine: EvoEngine) -> int:
    """Parameters a token is multiplied through: backbone without the embedding table (a lookup,
    not a matmul) with ONE adapter's LoRA (one is active per pass), plus the heads."""
    m = engine.model
    n = 0
    for name, p in m.backbone.named_parameters():
        if "embed_tokens" in name:
            continue
        if ".lora_" in name and ".memory_generator." not in name:
            continue  # count one adapter
        n += p.numel()
    for head in (m.latent_to_mem, m.mem_to_latent, m.mem_to_emb):
        n += sum(p.numel() for p in head.parameters())
    return n


def attention_flops(engine: EvoEngine) -> float:
    """Causal attention FLOPs of the last batched step: per full-attention layer and row of length
    T, QK^T and AV cost 2 * 2 * T^2/2 * heads * head_dim."""
    cfg = engine.model.config.backbone
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types:
        layers = sum(1 for t in types if t == "full_attention")
    width = cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return sum(2.0 * rows * T * T * width * layers for _, rows, T in engine.last_stats.per_pass)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for frag, v in BF16_PEAK_TFLOPS.items():
        if frag in name:
            return v
    return None


def bench_gpu(rep: Report, args) -> None:
    if not torch.cuda.is_available():
        msg = ("GPU mode skipped: torch.cuda.is_available() is False on this machine "
               f"(torch {torch.__version__}); run with a CUDA build of torch on a GPU host.")
        log(msg)
        rep.notes.append(msg)
        return
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    log(f"GPU mode on {name}: building/loading the bench1024 checkpoint (hidden 1024, 24 layers) ...")
    engine = load_engine(cached_tiny_checkpoint("qwen3", "bench1024"), device="cuda", dtype="bfloat16")
    sync = torch.cuda.synchronize
    hist = max(int(x) for x in args.histories.split(","))
    bench_batching(engine, Report(), n_conv=args.convs, history=hist, reps=1, label="(gpu warm-up)", sync=sync)
    res = bench_batching(engine, rep, n_conv=args.gpu_convs, history=hist, reps=args.reps_batch,
                         label="(b, GPU bf16 bench1024)", sync=sync)
    # FLOPs of the last batched step (bench_batching leaves its stats in engine.last_stats): useful
    # tokens through the weights, plus causal attention over the padded pass lengths
    n_params = flop_params(engine)
    flops = 2.0 * n_params * res["tokens"] + attention_flops(engine)
    tflops = flops / res["batched_s"] / 1e12
    peak = peak_tflops(name, args.peak_tflops)
    rep.add("(b, GPU) batched tokens/s (real / padded)",
            f"{res['tokens'] / res['batched_s']:,.0f} / {res['padded_tokens'] / res['batched_s']:,.0f}")
    rep.add("(b, GPU) achieved TFLOP/s (2 x params x real tokens + attention)", f"{tflops:.1f}")
    if peak:
        rep.add(f"(b, GPU) fraction of {name} dense bf16 peak ({peak:.0f} TFLOP/s)", f"{100 * tflops / peak:.1f}%")
    else:
        rep.notes.append(f"no bf16 peak known for {name!r}: pass --peak-tflops to get the fraction of peak")
    rep.notes.append(f"(b, GPU) {n_params / 1e6:.1f}M parameters per token (backbone without embeddings, one "
                     f"LoRA adapter, heads); device {name}, {args.gpu_convs} conversations.")


# --------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.platform()} ({cpu}), {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny (hidden 64) or small (hidden 256)")
    ap.add_argument("--turns", type=int, default=501, help="length of the long conversation (last turn is timed)")
    ap.add_argument("--early", type=int, default=10, help="the early turn that is timed")
    ap.add_argument("--reps-inc", type=int, default=7)
    ap.add_argument("--reps-ref", type=int, default=7)
    ap.add_argument("--reps-seg", type=int, default=5, help="repetitions per turn of the three segment windows")
    ap.add_argument("--convs", type=int, default=64)
    ap.add_argument("--histories", default="0,8",
                    help="(b) is run once per value: turns of history each conversation already has")
    ap.add_argument("--reps-batch", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a small shared machine, more threads "
                         "spinning against other processes make the timings erratic)")
    ap.add_argument("--gpu", choices=["auto", "on", "off"], default="auto",
                    help="GPU mode (bench1024, bf16): auto = when CUDA is available")
    ap.add_argument("--gpu-convs", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak, for the fraction of peak")
    ap.add_argument("--cache-turns", type=int, default=48,
                    help="(d) length of the conversation streamed with and without the prefix cache")
    ap.add_argument("--reps-cache", type=int, default=9, help="(d) repetitions of the timed segment")
    ap.add_argument("--cache-families", default="qwen3,qwen3_5",
                    help="(d) families for the work ratio (the first is also timed by position)")
    ap.add_argument("--only-cache", action="store_true", help="run (d) only (skips (a), (b), (c) and GPU mode)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    # issue 11: the series behind the plots (`python -m benchmarks.plots`)
    ap.add_argument("--history-points", default="",
                    help="(a) more turns to time, incremental and re-read, besides --early and the last "
                         "(comma-separated, e.g. 100,200,300: points of the ms-per-turn-by-history plot)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                    help=f"where the raw series are saved as JSON ({ENGINE_HISTORY_FILE}, {ENGINE_PREFIX_CACHE_FILE})")
    ap.add_argument("--no-results", action="store_true", help="do not save the raw series")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    rep = Report()
    rep_d = Report()  # (d) goes to its own section
    log(f"loading the {args.size} qwen3 checkpoint ...")
    engine = load_engine(cached_tiny_checkpoint("qwen3", args.size))
    cfg = engine.model.config
    model_desc = (f"seeded tiny checkpoint `tiny-qwen3-{args.size}`: hidden {cfg.hidden_size}, "
                  f"{cfg.backbone['num_hidden_layers']} layers, LoRA r={cfg.lora_r}, float32, real Qwen3 tokenizer; "
                  f"L={cfg.num_latents}, C={cfg.buffer_capacity}")

    history: dict | None = None
    segment: dict | None = None
    if not args.only_cache:
        points = tuple(int(x) for x in args.history_points.split(",") if x.strip())
        history = bench_long_conversation(engine, rep, n_turns=args.turns, early=args.early, reps_inc=args.reps_inc,
                                          reps_ref=args.reps_ref, reps_seg=args.reps_seg, history_points=points)
        for h in [int(x) for x in args.histories.split(",") if x.strip()]:
            bench_batching(engine, rep, n_conv=args.convs, history=h, reps=args.reps_batch,
                           label=f"(b) h={h}")
        hmax = max(int(x) for x in args.histories.split(",") if x.strip())
        if hmax > 0:
            with_cache = EvoEngine(engine.model, engine.tokenizer, config=EngineConfig(prefix_cache_max_bytes=1 << 40))
            bench_batching(with_cache, rep, n_conv=args.convs, history=hmax, reps=args.reps_batch,
                           label=f"(b, prefix cache) h={hmax}")
    for k, fam in enumerate(f.strip() for f in args.cache_families.split(",") if f.strip()):
        series = bench_prefix_cache(rep_d, family=fam, size=args.size, n_turns=args.cache_turns,
                                    reps=args.reps_cache, timing=(k == 0))
        segment = segment or series
    if args.gpu != "off" and not args.only_cache:
        if args.gpu == "on" or torch.cuda.is_available():
            bench_gpu(rep, args)
        else:
            msg = "GPU mode skipped: no CUDA device here (torch.cuda.is_available() is False)."
            log(msg)
            rep.notes.append(msg)

    wall = time.perf_counter() - t_all
    given = list(argv if argv is not None else sys.argv[1:])
    cmd = " ".join(["python -m benchmarks.bench_engine"] + given)
    parts = ([] if args.only_cache else [(SECTION, rep)]) + [(SECTION_CACHE, rep_d)]
    for title, r in parts:
        table = r.table()
        verdict = ", ".join(f"{'PASS' if ok else 'MISS'}: {m}" for m, ok in r.verdicts)
        print(f"## {title}")
        print(table)
        for line in r.lines:
            print(line)
        for n in r.notes:
            print("- " + n)
        print(verdict)
        if args.no_write:
            continue
        body = "\n".join([
            f"Command: `.venv/bin/{cmd}` (whole run {wall:.0f} s)",
            "",
            f"- machine: {machine()}",
            f"- model: {model_desc}" + ("; (d) also the same-size seeded Qwen3.5 checkpoint"
                                       if title == SECTION_CACHE else ""),
            f"- date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            ("- each ratio is taken within this one run; repetitions of the compared cases are interleaved, "
             "so load from other processes hits both sides alike"),
            f"- load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            "",
            table,
            "",
            *r.lines,
            "",
            *("- " + n for n in r.notes),
            "",
            "Targets: " + verdict,
        ])
        update_section(args.out, title, body)
        log(f"updated {args.out} section {title!r}")
    if not args.no_results:
        run = RunInfo.now(f".venv/bin/{cmd}")
        if history is not None:
            log(f"saved {write_json(EngineHistory(run=run, model=model_desc, **history), args.results_dir / ENGINE_HISTORY_FILE)}")
        if segment is not None:
            log(f"saved {write_json(PrefixCacheSegment(run=run, model=model_desc, **segment), args.results_dir / ENGINE_PREFIX_CACHE_FILE)}")
    print(f"(whole run {wall:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
