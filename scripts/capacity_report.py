"""docs/CAPACITY.md from measured figures (issue #14), and a planner for your own numbers.

Why a script: every number in the capacity document must come from a measurement
(benchmarks/capacity_measure.py -> benchmarks/results/capacity.json, and the scale run ->
benchmarks/results/capacity_scale.json). The document is regenerated, never edited by hand.
The same model answers a user's own question:

    .venv/bin/python scripts/capacity_report.py                      # regenerate docs/CAPACITY.md
    .venv/bin/python scripts/capacity_report.py plan --conversations 250000 --turns-per-s 300 \\
        --size 2B --storage bfloat16 --redis-node-gib 64 --worker-turns-per-s 40
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import capacity_sections as issue22  # noqa: E402 - worker memory, model time by dtype, cold tier (issue #22)

RESULTS = REPO / "benchmarks" / "results" / "capacity.json"
SCALE = REPO / "benchmarks" / "results" / "capacity_scale.json"
OUT = REPO / "docs" / "CAPACITY.md"

GIB = 1024 ** 3
MIB = 1024 ** 2
KAFKA_RECORD_OVERHEAD = 70  # bytes of record framing per record (v2 record batch, amortised); an input, not measured

CONVERSATIONS = [10_000, 100_000, 1_000_000, 10_000_000]
RATES = [100, 1_000, 10_000]


@dataclass(frozen=True)
class Inputs:
    """What the model needs. Measured inputs come from capacity.json; the rest are the
    user's (defaults are illustrations, marked as such in the document)."""

    conv_bytes: float          # Redis bytes per live conversation (measured, steady or by turn)
    write_bytes_per_turn: float  # Redis write payload per turn, compactions included (measured)
    event_bytes: float         # embedding event JSON (measured)
    turn_bytes: float          # turn event JSON (measured on the sample conversations)
    commands_per_turn: float   # Redis commands per turn: commit + ack (measured)
    script_usec_per_turn: float  # server time of the commit script per conversation (measured)
    worker_turns_per_s: float  # per worker, per device type (measured on CPU; yours for GPU)
    redis_node_bytes: float = 100 * GIB  # user input: memory of one Redis node/shard
    redis_headroom: float = 0.75  # user input: usable share (fork, replication buffers, fragmentation)
    net_bytes_per_s: float = 10e9 / 8  # user input: one NIC (10 Gbit/s)
    replication: int = 3       # user input: Kafka replication factor


def plan(inp: Inputs, conversations: int, turns_per_s: float) -> dict[str, float]:
    mem = conversations * inp.conv_bytes
    usable = inp.redis_node_bytes * inp.redis_headroom
    write = turns_per_s * inp.write_bytes_per_turn
    return {
        "redis_memory_bytes": mem,
        "redis_nodes_for_memory": math.ceil(mem / usable) if mem else 0,
        "redis_write_bytes_per_s": write,
        "redis_aof_bytes_per_s": write,  # appendonly: the same payload is appended to disk
        "redis_commands_per_s": turns_per_s * inp.commands_per_turn,
        "redis_script_cpu_share": turns_per_s * inp.script_usec_per_turn / 1e6,  # of one core (Redis runs scripts on one thread)
        "kafka_in_bytes_per_s": turns_per_s * (inp.turn_bytes + KAFKA_RECORD_OVERHEAD),
        "kafka_out_bytes_per_s": turns_per_s * (inp.event_bytes + KAFKA_RECORD_OVERHEAD),
        "kafka_disk_bytes_per_s": turns_per_s * (inp.turn_bytes + inp.event_bytes + 2 * KAFKA_RECORD_OVERHEAD) * inp.replication,
        "workers": math.ceil(turns_per_s / inp.worker_turns_per_s) if inp.worker_turns_per_s > 0 else None,
        "max_conversations_per_node": usable / inp.conv_bytes,
        "max_turns_per_s_per_nic_redis": inp.net_bytes_per_s / inp.write_bytes_per_turn,
        "max_turns_per_s_per_shard_cpu": 1e6 / inp.script_usec_per_turn,
    }


# ---------------------------------------------------------------------------------------------


MODEL_TIME = REPO / "benchmarks" / "results" / "capacity_model_time.json"


def load() -> tuple[dict[str, Any], dict[str, Any] | None]:
    data = json.loads(RESULTS.read_text())
    if MODEL_TIME.exists():  # the slow model-time run (`--model-time-only --out ...capacity_model_time.json`)
        mt = json.loads(MODEL_TIME.read_text())
        data["model_time"] = mt["model_time"]
        for k, v in mt["meta"].items():
            if "model_time" in k:
                data["meta"][k] = v
    scale = json.loads(SCALE.read_text()) if SCALE.exists() else None
    return data, scale


def redis_row(data: dict[str, Any], size: str, storage: str) -> dict[str, Any]:
    for r in data["redis"]:
        if r["size"] == size and r["storage_dtype"] == storage:
            return r
    raise KeyError(f"no measurement for {size} {storage}")


def ops_per_turn(data: dict[str, Any]) -> tuple[float, float]:
    ops = data["redis_ops"]
    b = ops["batch_conversations"]
    commit = ops["commit (append deltas + outbox)"]
    ack = ops["ack outbox"]
    return (commit["commands"] + ack["commands"]) / b, commit["script_server_usec_per_conversation"]


def worker_rate(data: dict[str, Any], extra: dict[str, Any] | None = None) -> tuple[float | None, str]:
    """Turns/s of one CPU worker at the 0.8B shape: the compute dtype measured faster on this host
    (issue #22, benchmarks/results/precision.json), else this script's own model-time run."""
    tps, what = issue22.worker_rate(issue22.load_extra() if extra is None else extra)
    if tps:
        return tps, what
    mt = data.get("model_time", {}).get("cpu_0.8B")
    if not mt:
        return None, "not measured"
    return mt["turns_per_s_batch"], f"CPU, {mt['torch_threads']} threads, batch {mt['batch']}"


def inputs_for(data: dict[str, Any], size: str, storage: str, worker_tps: float | None) -> Inputs:
    r = redis_row(data, size, storage)
    cmds, usec = ops_per_turn(data)
    return Inputs(conv_bytes=r["steady_mean"], write_bytes_per_turn=r["write_bytes_per_turn_mean"],
                  event_bytes=data["kafka"]["embedding_event_bytes"],
                  turn_bytes=data["kafka"]["turn_event_bytes_mean_sample"], commands_per_turn=cmds,
                  script_usec_per_turn=usec, worker_turns_per_s=worker_tps or 0.0)


def fmt_bytes(n: float) -> str:
    if n >= GIB * 1024:
        return f"{n / GIB / 1024:,.1f} TiB"
    if n >= GIB:
        return f"{n / GIB:,.1f} GiB"
    if n >= MIB:
        return f"{n / MIB:,.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{n:,.0f} B"


def fmt_rate(n: float) -> str:
    return fmt_bytes(n) + "/s"


def render(data: dict[str, Any], scale: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> str:
    meta = data["meta"]
    extra = issue22.load_extra() if extra is None else extra
    out: list[str] = []
    w = out.append
    w("# Capacity: what live conversations cost")
    w("")
    w("<!-- generated by scripts/capacity_report.py from benchmarks/results/capacity.json; do not edit by hand -->")
    w("")
    w("Every figure below was measured by the command named with it; the model in section 5 turns "
      "them into resources for a deployment, with the inputs you can change stated next to it "
      "(`scripts/capacity_report.py plan ...` computes it for your numbers).")
    w("")
    w(f"- measurements: `{meta.get('command', '?')}` ({meta.get('date_utc', '?')}; whole run {meta.get('wall_s', 0):.0f} s)")
    if meta.get("command_model_time"):
        w(f"- model time: `{meta['command_model_time']}` ({meta.get('date_model_time', '?')})")
    w(f"- machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}; Redis: {meta.get('redis', '?')} "
      f"(allocator {meta.get('allocator', '?')}), started by the script, no persistence")
    cpus = sorted({x["run"]["cpu"] for x in extra.values() if x.get("run", {}).get("cpu")})
    if cpus:
        w(f"- host CPU of the figures from precision.json, query_cache.json and cold_tier.json (section 4 \"By compute "
          f"dtype\", 4b, 8, and the CPU workers of section 5): {'; '.join(cpus)}")
    w(f"- GPU: {meta['gpu']}. GPU figures are therefore not in this document; "
      "`benchmarks/bench_engine.py --gpu on` measures the batched step where a GPU exists.")
    w(f"- model constants: {meta['num_latents']} latents per turn, queue of {meta['buffer_capacity']} latents, "
      f"segments of {meta['segment_turns']} turns, a full state rewritten every {meta['compact_every']} deltas "
      "(`EVOSTREAM_COMPACT_EVERY`)")
    w("")

    # summary -------------------------------------------------------------------------------
    w("## Summary")
    w("")
    a, b = redis_row(data, "0.8B", "float32"), redis_row(data, "0.8B", "bfloat16")
    queue = data["meta"]["buffer_capacity"] * 1024 * 2
    w(f"- A live conversation of the 0.8B model holds **{fmt_bytes(b['steady_mean'])}** of Redis on average once its "
      f"queue is full with latents stored in bfloat16 (up to {fmt_bytes(b['steady_max'])} just before a compaction), "
      f"{fmt_bytes(a['steady_mean'])} in float32: {b['steady_mean'] / queue:.2f} times the bare queue "
      f"({fmt_bytes(queue)}), because the stored base carries the open segment and the delta list repeats up to 32 "
      "turns until the next compaction. Short conversations cost less: see the by-turn columns.")
    for s_ in ("0.8B", "4B"):
        try:
            f_, h_ = redis_row(data, s_, "float32"), redis_row(data, s_, "bfloat16")
        except KeyError:
            continue
        w(f"- 1M live conversations of the {s_} model: {fmt_bytes(1e6 * f_['steady_mean'])} of Redis in float32, "
          f"{fmt_bytes(1e6 * h_['steady_mean'])} with bfloat16 storage.")
    wtps, _ = worker_rate(data, extra)
    lo = plan(inputs_for(data, "0.8B", "bfloat16", wtps), 0, RATES[-1])
    hi_cfg = ("4B", "float32") if any(r["size"] == "4B" and r["storage_dtype"] == "float32" for r in data["redis"]) else ("0.8B", "float32")
    hi = plan(inputs_for(data, *hi_cfg, wtps), 0, RATES[-1])
    nic = Inputs.__dataclass_fields__["net_bytes_per_s"].default
    w(f"- Redis memory runs out first: a 100 GiB node holds {plan(inputs_for(data, '0.8B', 'bfloat16', wtps), 1, 0)['max_conversations_per_node']:,.0f} "
      f"live 0.8B conversations (bfloat16). At {RATES[-1]:,} turns/s the Redis writes are {fmt_rate(lo['redis_write_bytes_per_s'])} "
      f"(0.8B bfloat16) to {fmt_rate(hi['redis_write_bytes_per_s'])} ({hi_cfg[0]} {hi_cfg[1]}), i.e. "
      f"{lo['redis_write_bytes_per_s'] / nic:.1f} to {hi['redis_write_bytes_per_s'] / nic:.1f} times one 10 Gbit/s NIC, spread over the shards "
      f"that memory needs anyway; Kafka carries {fmt_rate(lo['kafka_out_bytes_per_s'])} of embeddings (section 5).")
    w("- Idle conversations need not stay in RAM: the cold tier keeps them on disk and restores them exactly "
      "on their next turn (section 6).")
    for line in issue22.summary(extra):
        w(line)
    w("")

    # 1 -------------------------------------------------------------------------------------
    w("## 1. One conversation in Redis (measured)")
    w("")
    w("A conversation driven turn by turn through the real `MemoryStore` (commit script, "
      "deltas, compaction, outbox acked as the pipeline does) with states of the released shapes "
      "(random latents; values do not change sizes). Bytes = `MEMORY USAGE key SAMPLES 0` summed "
      f"over the conversation's five keys; {data['redis'][0]['turn_tokens']} memory tokens per turn "
      "(their ids are stored too, 4 bytes each).")
    w("")
    w("| size | hidden | latents stored as | after turn 1 | turn 8 | turn 16 | turn 32 (queue full) | steady mean | steady max | delta per turn | Redis write per turn (mean, compactions included) |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["redis"]:
        bt = r["bytes_by_turn"]
        w(f"| {r['size']} ({r['family']}) | {r['hidden']} | {r['storage_dtype']} | {fmt_bytes(bt['1'])} | "
          f"{fmt_bytes(bt['8'])} | {fmt_bytes(bt['16'])} | {fmt_bytes(bt['32'])} | **{fmt_bytes(r['steady_mean'])}** | "
          f"{fmt_bytes(r['steady_max'])} | {fmt_bytes(r['delta_payload_bytes'])} | {fmt_bytes(r['write_bytes_per_turn_mean'])} |")
    w("")
    r0 = data["redis"][0]
    pk = r0["steady_per_key_mean"]
    w(f"Why the steady state is about 1.5 times the queue (C x H values): the `base` holds the queue "
      f"*and* the open segment's latents (up to 512 + 15 x 16 rows), and the `deltas` list holds every "
      f"turn since the last compaction (up to 32 x 16 rows), which the next compaction folds into the "
      f"base. Mean per key at {r0['size']} {r0['storage_dtype']}: "
      + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in pk.items())
      + f". Steady = turns {r0['steady_turns']} (two compaction cycles after the queue filled). "
      f"An event waiting in the outbox (broker slow or down) adds {fmt_bytes(r0['outbox_bytes_per_pending_event'])} until acknowledged.")
    w("")
    chk = [(r["size"], r["storage_dtype"], r["used_memory_check"]) for r in data["redis"]]
    w("Cross-check against the server's own count (`INFO used_memory` growth over "
      f"{chk[0][2]['conversations']} conversations at turn {chk[0][2]['at_turn']}, divided by the summed `MEMORY USAGE`): "
      + ", ".join(f"{s} {d}: {c['ratio']:.3f}" for s, d, c in chk) + f". This Valkey build uses the {meta.get('allocator')} "
      "allocator; a jemalloc build rounds allocations into its own size classes, so check `MEMORY USAGE` on yours.")
    w("")

    # 2 -------------------------------------------------------------------------------------
    ops = data["redis_ops"]
    w("## 2. Redis work per batch (measured)")
    w("")
    w(f"A batch of {ops['batch_conversations']} conversations, one turn each (`hidden 1024`): round trips "
      "counted at the client, commands from `INFO commandstats` (commands inside the Lua scripts included), "
      "server time of the scripts from the same counters.")
    w("")
    w("| step | round trips | commands | per conversation | script server time per conversation |")
    w("|---|---|---|---|---|")
    for name in ("load (state cache miss)", "commit (append deltas + outbox)", "ack outbox"):
        o = ops[name]
        nb = ops["batch_conversations"]
        each = ", ".join(f"{k} {v // nb}" for k, v in sorted(o["by_command"].items()))
        w(f"| {name} | {o['round_trips']} | {o['commands']} | {o['commands'] / nb:.1f} ({each}) | "
          f"{o['script_server_usec_per_conversation']:.0f} µs |")
    w("")
    w("A batch therefore costs 2 round trips when its states are cached by the worker (commit, ack) and 3 "
      "when they are not (load first), whatever the number of conversations in it.")
    w("")

    # 3 -------------------------------------------------------------------------------------
    k = data["kafka"]
    w("## 3. Kafka bytes (measured)")
    w("")
    w("| record | bytes |")
    w("|---|---|")
    w(f"| embedding event (JSON, 1024-d float32 vector in base64), as the pipeline builds it | {k['embedding_event_bytes']:,.0f} |")
    w(f"| same, in a batch of 64 compressed with zstd (`EVOSTREAM_OUTPUT_COMPRESSION=zstd`) | {k['embedding_batch64_zstd_bytes_per_event']:,.0f} per event |")
    w(f"| same, lz4 | {k['embedding_batch64_lz4_bytes_per_event']:,.0f} per event |")
    w(f"| turn event (input), mean over the {k['turn_events_in_sample']} turns of data/sample_conversations.jsonl | {k['turn_event_bytes_mean_sample']:,.0f} |")
    w("")
    w(f"Payload only; the model adds {KAFKA_RECORD_OVERHEAD} B of framing per record (an assumption, not measured) and the replication factor.")
    w("")

    # 4 -------------------------------------------------------------------------------------
    w("## 4. Model time per turn (measured)")
    w("")
    mt = data.get("model_time", {}).get("cpu_0.8B")
    if mt:
        w(f"0.8B shape ({mt['shape']}, {mt['params'] / 1e6:,.0f} M parameters, random weights), "
          f"{mt['device']} {mt['dtype']}, {mt['torch_threads']} torch threads on the shared 2-core machine, "
          "each conversation with a full queue (512 latents) and each timed turn opening a new segment "
          "(the most expensive turn: the segment's snapshot is re-read); an approximation of the shape (MLP 3072) "
          "built before issue 10's exact one:")
        w("")
        w("| case | seconds | positions run | turns/s |")
        w("|---|---|---|---|")
        reps = " / ".join(f"{x:.1f}" for x in mt["one_turn_s"])
        w(f"| one turn ({len(mt['one_turn_s'])} repetitions) | {reps} | {mt['one_turn_positions']:,} | {mt['turns_per_s_one']:.4f} (median) |")
        w(f"| batch of {mt['batch']} | {mt['batch_s']:.1f} | {mt['batch_positions']:,} | {mt['turns_per_s_batch']:.4f} |")
        w("")
        w(f"The machine was running other work at the same time (load average {meta.get('loadavg_1m_at_start', float('nan')):.1f} "
          "on 2 cores at the start of the Redis measurement run), hence the spread between repetitions. ")
        w("The qwen3_5 linear-attention layers run on transformers' reference PyTorch fallback here "
          "(no `flash-linear-attention` / `causal_conv1d` kernels on CPU), so this is a floor, not a "
          "target: a CPU is not a serving device for the released sizes. The tiny model's figures are "
          "in BENCHMARKS.md.")
    else:
        w("Not measured in this run (`--model-time`).")
    w("")
    w("### By compute dtype, on this host (issue #22)")
    w("")
    for line in issue22.model_time(extra):
        w(line)
    w("")
    w("No GPU was lent to this work, so no GPU row: measure `benchmarks/bench_engine.py --gpu on` on yours "
      "and pass its turns/s as `--worker-turns-per-s` to the planner.")
    w("")

    # 4b ------------------------------------------------------------------------------------
    w("## 4b. Worker memory: the model and its caches (measured)")
    w("")
    for line in issue22.worker_memory(extra, state_cache_default=256 * MIB):
        w(line)
    w("")

    # 5 -------------------------------------------------------------------------------------
    w("## 5. The model")
    w("")
    w("Inputs (measured unless marked *yours*):")
    w("")
    w("| input | symbol | value used below |")
    w("|---|---|---|")
    w("| live conversations (inside the TTL window) | N | *yours*: 10k, 100k, 1M, 10M |")
    w("| turns per second, all conversations | R | *yours*: 100, 1k, 10k |")
    w("| Redis bytes per live conversation | S | section 1, steady mean (use the by-turn columns for short conversations) |")
    w("| Redis write bytes per turn | Wt | section 1 |")
    w("| Redis commands per turn | Q | section 2: commit + ack (a cache miss adds the load's) |")
    w("| script server time per turn | U | section 2 (Redis runs scripts on one thread per shard) |")
    w("| Kafka bytes per turn in / out | Ti / Eo | section 3, plus framing |")
    w("| turns/s per worker | P | section 4 (per device type) |")
    w("| memory of one Redis node | M | *yours*; 100 GiB below |")
    w("| usable share of it | h | *yours*; 0.75 below (fork for AOF rewrite, replication buffers, fragmentation) |")
    w("| network of one Redis node | B | *yours*; 10 Gbit/s below |")
    w("| Kafka replication factor | F | *yours*; 3 below |")
    w("")
    w("Formulas: Redis memory = N x S; Redis nodes = ceil(N x S / (M x h)); Redis write bandwidth = R x Wt "
      "(the same again to the AOF on disk); Redis commands/s = R x Q; share of one Redis core = R x U; "
      "Kafka in = R x (Ti + 70), out = R x (Eo + 70), broker disk = F x (in + out); workers = ceil(R / P).")
    w("")
    worker_tps, worker_what = worker_rate(data, extra)
    configs = [(s, d) for s in ("0.8B", "2B", "4B") for d in ("float32", "bfloat16")
               if any(r["size"] == s and r["storage_dtype"] == d for r in data["redis"])]
    w("### Redis memory by live conversations")
    w("")
    w("| live conversations | " + " | ".join(f"{s} {d}" for s, d in configs) + " |")
    w("|---|" + "---|" * len(configs))
    for n in CONVERSATIONS:
        cells = []
        for s, d in configs:
            p = plan(inputs_for(data, s, d, worker_tps), n, 0)
            cells.append(f"{fmt_bytes(p['redis_memory_bytes'])} ({p['redis_nodes_for_memory']} node{'s' if p['redis_nodes_for_memory'] != 1 else ''})")
        w(f"| {n:,} | " + " | ".join(cells) + " |")
    w("")
    w("Nodes: of 100 GiB at 75 % use, memory only (add replicas for availability).")
    w("")
    w("### Bandwidth, commands and workers by turn rate")
    w("")
    w("| turns/s | Redis write (0.8B bf16) | Redis write (4B float32) | Redis commands/s | share of one Redis core (scripts) | Kafka in | Kafka out | Kafka broker disk (x3) | CPU workers, 0.8B shape |")
    w("|---|---|---|---|---|---|---|---|---|")
    for rate in RATES:
        a = plan(inputs_for(data, "0.8B", "bfloat16", worker_tps), 0, rate)
        b = plan(inputs_for(data, "4B", "float32", worker_tps), 0, rate) if ("4B", "float32") in configs else a
        workers = f"{a['workers']:,}" if worker_tps else "not measured"
        w(f"| {rate:,} | {fmt_rate(a['redis_write_bytes_per_s'])} | {fmt_rate(b['redis_write_bytes_per_s'])} | "
          f"{a['redis_commands_per_s']:,.0f} | {a['redis_script_cpu_share']:.2f} | {fmt_rate(a['kafka_in_bytes_per_s'])} | "
          f"{fmt_rate(a['kafka_out_bytes_per_s'])} | {fmt_rate(a['kafka_disk_bytes_per_s'])} | {workers} |")
    w("")
    w(f"CPU workers: {worker_what}. GPU workers: not measured here (no GPU lent); plug yours in.")
    w("")
    w("### Where each resource runs out")
    w("")
    w("| resource | limit (with the inputs above) | what runs out first |")
    w("|---|---|---|")
    for s, d in configs:
        p = plan(inputs_for(data, s, d, worker_tps), 1, 1)
        w(f"| Redis memory, {s} {d} | {p['max_conversations_per_node']:,.0f} live conversations per 100 GiB node | "
          f"memory, long before anything else: 1M live conversations need {fmt_bytes(1e6 * redis_row(data, s, d)['steady_mean'])} |")
    p08 = plan(inputs_for(data, "0.8B", "bfloat16", worker_tps), 1, 1)
    p4 = plan(inputs_for(data, "4B", "float32", worker_tps), 1, 1) if ("4B", "float32") in configs else p08
    w(f"| Redis network (writes), 10 Gbit/s | {p08['max_turns_per_s_per_nic_redis']:,.0f} turns/s (0.8B bf16) ... "
      f"{p4['max_turns_per_s_per_nic_redis']:,.0f} turns/s (4B float32) per node | beyond it, the shards that memory needs anyway share the writes |")
    w(f"| Redis CPU (one thread per shard runs the scripts) | {p08['max_turns_per_s_per_shard_cpu']:,.0f} turns/s per shard (commit script "
      "time measured on the loaded 2-core machine; replication and AOF add to it) | shard by conversation (keys carry a cluster hash tag) |")
    top = plan(inputs_for(data, "0.8B", "bfloat16", worker_tps), 0, RATES[-1])
    w(f"| Kafka | {fmt_rate(top['kafka_out_bytes_per_s'])} out, {fmt_rate(top['kafka_in_bytes_per_s'])} in at {RATES[-1]:,} turns/s | "
      "not the constraint at these rates |")
    if worker_tps:
        w(f"| model workers | {worker_tps:.3f} turns/s per CPU worker (0.8B shape) | compute: the CPU cannot serve the released sizes; GPU workers are the sizing question, measure yours |")
    w("")

    # 6 -------------------------------------------------------------------------------------
    lv = data["levers"]
    w("## 6. Levers (measured: bytes saved and effect on exactness)")
    w("")
    b16 = lv["bfloat16_storage"]
    w("| lever | setting | bytes saved | effect on exactness |")
    w("|---|---|---|---|")
    savings = []
    for s in ("0.8B", "2B", "4B"):
        try:
            f, h = redis_row(data, s, "float32"), redis_row(data, s, "bfloat16")
        except KeyError:
            continue
        savings.append(f"{s}: {fmt_bytes(f['steady_mean'])} -> {fmt_bytes(h['steady_mean'])} ({1 - h['steady_mean'] / f['steady_mean']:.0%})")
    w(f"| latents stored in bfloat16, model computes in float32 | `EVOSTREAM_STATE_STORAGE_DTYPE=bfloat16` | "
      f"{'; '.join(savings)} per conversation; write bytes per turn halve too | "
      f"cosine of every turn's embedding against an uninterrupted float32 run, {lv['conversations']} conversations x {lv['turns']} turns "
      f"({lv['model']}): min {b16['cosine_vs_float32_min']:.6f}, mean {b16['cosine_vs_float32_mean']:.6f}. "
      f"Each turn's latents are rounded when applied, so reloading after every turn gives bit-identical embeddings "
      f"to never reloading: {b16['reload_every_turn_equals_no_reload_bitwise']} |")
    st = lv.get("store", {})
    ttl = st.get("ttl")
    if ttl:
        w(f"| per-tenant TTL | `EVOSTREAM_STATE_TTL_BY_TENANT={{\"brief\": 1}}` | {fmt_bytes(ttl['freed_per_expired_conversation'])} freed "
          f"per expired conversation ({st['conversations']} conversations of {st['turns_each']} turns, hidden {st['hidden']}, float32; "
          f"`INFO used_memory`); the marker ({fmt_bytes(ttl['marker_bytes_left_per_expired_conversation'])}) stays `MARKER_TTL_S` | "
          f"none while live; an expired conversation restarts with an empty memory, said in its next event "
          f"(`memory`: {', '.join(ttl['brief_after_expiry_origin'])}). On the tiny model the next turn's embedding "
          f"without memory has cosine {lv['ttl_expiry_next_turn_cosine_without_vs_with_memory']:.4f} to the one with it "
          f"(random weights: an illustration of the mechanism, not of a real model's loss) |")
    ct = st.get("cold_tier")
    ce = lv.get("cold_tier_exactness", {})
    if ct:
        w(f"| cold tier (SQLite shards) for idle conversations | `EVOSTREAM_COLD_TIER_PATH=/var/lib/evostream/cold` + "
          f"`evostream cold-tier freeze --idle-s 3600` (cron) | Redis: {fmt_bytes(ct['memory_usage_before'] / ct['frozen'])} -> "
          f"{fmt_bytes(ct['marker_bytes_left_per_conversation'])} per frozen conversation (the marker); disk: "
          f"{fmt_bytes(ct['sqlite_file_bytes'] / ct['frozen'])} each in SQLite. Freeze {ct['freeze_ms_per_conversation']:.0f} ms, "
          f"thaw on the next turn {ct['thaw_ms_per_conversation']:.0f} ms per conversation "
          f"({fmt_bytes(ct['payload_bytes_moved'] / ct['frozen'])} of payload each, {st['turns_each']} turns, hidden {st['hidden']}) | "
          f"exact: the restored keys are byte-identical, and the embeddings after a freeze at turn {ce.get('frozen_at_turn')} "
          f"and thaw equal the uninterrupted run bit for bit: {ce.get('embeddings_after_thaw_bitwise_equal')} |")
    sweep = data.get("compact_sweep")
    if sweep:
        cells = "; ".join(f"{m['compact_every']}: {fmt_bytes(m['steady_mean'])} held, {fmt_bytes(m['write_bytes_per_turn_mean'])} written per turn"
                          for m in sorted(sweep, key=lambda m: m["compact_every"]))
        w(f"| compact more often | `EVOSTREAM_COMPACT_EVERY` (0.8B, bfloat16; `{meta.get('command_compact_sweep', '?')}`) | {cells} | "
          "none: the stored state is the same, only its layout (fewer deltas beside the base) and the write traffic change |")
    w("")
    if ct:
        w("The levers compose: bfloat16 storage halves every row of section 5's memory table; a cold tier "
          f"moves the idle part of N to disk, so Redis needs N_active x S plus {fmt_bytes(ct['marker_bytes_left_per_conversation'])} "
          "(the marker) per frozen conversation, and the first turn after idling waits for the thaw.")
    w("")

    # 7 -------------------------------------------------------------------------------------
    w("## 7. Scale run on this machine")
    w("")
    if scale:
        w(f"Command: `{scale['command']}` ({scale['date_utc']}). Full figures in BENCHMARKS.md.")
        w("")
        w("| figure | value |")
        w("|---|---|")
        for key, val in scale["summary"].items():
            w(f"| {key} | {val} |")
    else:
        w("Not run yet.")
    w("")

    # 8 -------------------------------------------------------------------------------------
    w("## 8. Cold tier at scale: freeze and thaw rates (measured)")
    w("")
    per_conv = ct["sqlite_file_bytes"] / ct["frozen"] if ct else None
    for line in issue22.cold_tier(extra, per_conv):
        w(line)
    w("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("plan", help="resources for your numbers")
    g.add_argument("--conversations", type=int, required=True, help="live conversations (inside the TTL window)")
    g.add_argument("--turns-per-s", type=float, required=True, help="turns per second, all conversations")
    g.add_argument("--size", choices=["0.8B", "2B", "4B"], default="0.8B")
    g.add_argument("--storage", choices=["float32", "bfloat16"], default="bfloat16")
    g.add_argument("--conversation-bytes", type=float, default=None,
                   help="override the Redis bytes per conversation (e.g. the by-turn figure of short conversations)")
    g.add_argument("--redis-node-gib", type=float, default=100)
    g.add_argument("--redis-headroom", type=float, default=0.75)
    g.add_argument("--net-gbit", type=float, default=10)
    g.add_argument("--worker-turns-per-s", type=float, default=None, help="your device's turns/s per worker")
    g.add_argument("--replication", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    data, scale = load()
    if args.cmd == "plan":
        wt, _ = worker_rate(data)
        if args.size != "0.8B":
            wt = None  # only the 0.8B shape's model time was measured: bring your own figure
        base = inputs_for(data, args.size, args.storage, args.worker_turns_per_s or wt)
        inp = Inputs(**{**base.__dict__,
                        "conv_bytes": args.conversation_bytes or base.conv_bytes,
                        "redis_node_bytes": args.redis_node_gib * GIB, "redis_headroom": args.redis_headroom,
                        "net_bytes_per_s": args.net_gbit * 1e9 / 8, "replication": args.replication})
        res = plan(inp, args.conversations, args.turns_per_s)
        json.dump({"inputs": inp.__dict__, "result": res}, sys.stdout, indent=1)
        print()
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Every number the document prints is saved (results/capacity_doc.json) and written as a
    # figure marker into that file: a figure edited by hand fails tests/test_figures.py.
    sys.path.insert(0, str(REPO))
    from benchmarks.report import mark_figures

    text, values = mark_figures(render(data, scale), "capacity_doc.json")
    (REPO / "benchmarks" / "results" / "capacity_doc.json").write_text(json.dumps({
        "document": "docs/CAPACITY.md", "rendered_by": "scripts/capacity_report.py",
        "from": "capacity.json, capacity_model_time.json, capacity_scale.json, precision.json, query_cache.json, "
                "cold_tier.json (benchmarks/results)",
        "about": "every number the document printed, in order (benchmarks/report.py)",
        "figures": values}, indent=1) + "\n")
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
