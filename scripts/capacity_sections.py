"""The sections of docs/CAPACITY.md that issue #22 added: worker memory (the model and its caches),
model time by compute dtype on this host, and the cold tier at scale. Rendered by
scripts/capacity_report.py from benchmarks/results/{precision,query_cache,cold_tier}.json; every
figure read straight from a results file is written as a marker (benchmarks/figures.py), so
tests/test_figures.py fails when the document and the file disagree. Derived numbers (how many
conversations a budget holds, hours per million) are computed here from those figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.figures import marker  # noqa: E402
from workers.memory_budget import AUTO_FRACTION, AUTO_MAX, AUTO_MIN, auto_cache_bytes  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
PRECISION, QUERY_CACHE, COLD_TIER = "precision.json", "query_cache.json", "cold_tier.json"
SHAPE = "qwen35_08b"
GIB, MIB = 1024 ** 3, 1024 ** 2
WORKER_MEMORY = (8 * GIB, 16 * GIB, 32 * GIB, 64 * GIB)


def load_extra(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    out = {}
    for name in (PRECISION, QUERY_CACHE, COLD_TIER):
        p = results_dir / name
        if p.exists():
            out[name] = json.loads(p.read_text())
    return out


def _m(extra: dict[str, Any], file: str) -> Callable[..., str]:
    return lambda path, fmt="", suffix="": marker(file, extra[file], path, fmt, suffix)


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB" if n < GIB else f"{n / GIB:,.2f} GiB"


def worker_rate(extra: dict[str, Any]) -> tuple[float | None, str]:
    """Turns/s of one CPU worker at the 0.8B shape in the compute dtype measured faster on this
    host (`EVOSTREAM_DTYPE=auto` would choose by the same kind of measurement)."""
    pr = extra.get(PRECISION)
    if not pr:
        return None, "not measured (run `python -m benchmarks.bench_precision`)"
    t = pr["timings"][pr["faster"]]
    return t["turns_per_s"], (f"CPU, {pr['faster']} (the faster on this host), one conversation per worker, "
                              f"{t['segment_turn_ms']:,.0f} ms per turn over a 16-turn segment "
                              f"(`{pr['run']['command']}`, {pr['run']['cpu']})")


def model_time(extra: dict[str, Any]) -> list[str]:
    pr = extra.get(PRECISION)
    if not pr:
        return ["The compute dtype has not been measured on this host: run `python -m benchmarks.bench_precision`."]
    f = _m(extra, PRECISION)
    dts = list(pr["timings"])
    lines = [f"The released 0.8B shape ({f('model')}) on this host's CPU, {f('run.cpu')}; "
             f"`{f('run.command')}` ({f('run.date_utc')}), both caches on as in a default worker:", "",
             "| compute dtype | first turn of a segment, ms | continuing turn, ms | per turn over a 16-turn segment, ms | turns/s per worker |",
             "|---|---|---|---|---|"]
    for d in dts:
        lines.append(f"| {d} | {f(f'timings.{d}.first_turn_ms', ',.0f')} | {f(f'timings.{d}.turn_ms', ',.0f')} | "
                     f"{f(f'timings.{d}.segment_turn_ms', ',.0f')} | {f(f'timings.{d}.turns_per_s', '.3f')} |")
    lines += ["", f"On this host **{f('faster')}** is faster (bfloat16 / float32 time of a continuing turn: "
              f"{f('bf16_over_fp32_turn', '.2f', 'x')}; a bf16 matmul ran oneDNN's `{f('onednn_bf16_matmul')}`). "
              "Section 5 sizes CPU workers with the faster of the two. The ratio belongs to the host, not to the "
              "model: CPUs with AMX run bf16 matmuls natively, so measure yours (`EVOSTREAM_DTYPE=auto` does at start)."]
    return lines


def worker_memory(extra: dict[str, Any], state_cache_default: int) -> list[str]:
    qc, pr = extra.get(QUERY_CACHE), extra.get(PRECISION)
    if not qc or SHAPE not in qc["sizes"]:
        return ["Not measured yet: run `python -m benchmarks.bench_query_cache`."]
    q = qc["sizes"][SHAPE]
    f = _m(extra, QUERY_CACHE)
    p = f"sizes.{SHAPE}"
    lines = ["A worker's memory is the model's weights, activations of the batch in flight, and three caches, each "
             "bounded by bytes and evicting the least recently used: the state cache (`EVOSTREAM_CACHE_MAX_BYTES`, "
             f"default {_mib(state_cache_default)}), the segment-prefix cache (`EVOSTREAM_PREFIX_CACHE_MAX_BYTES`) and "
             "the query-ready memory (`EVOSTREAM_QUERY_CACHE_MAX_BYTES`). The last two default to `auto`: "
             f"{AUTO_FRACTION:.3g} of the worker's memory each (its cgroup limit, else the host's RAM; the GPU's "
             f"memory on CUDA), at least {_mib(AUTO_MIN)}, at most {_mib(AUTO_MAX)}. Each is a bound, not an "
             "allocation: an entry evicted or missing only costs recomputation, never a different number.", "",
             f"Measured per conversation at the 0.8B shape ({f(f'{p}.model')}, {f(f'{p}.dtype')}; "
             f"`{f('run.command')}`, {f('run.date_utc')}, {f('run.cpu')}):", "",
             "| what one open conversation holds | bytes |", "|---|---|",
             f"| segment-prefix cache, after a segment's 2nd turn ({f(f'{p}.prefix_positions', ',d')} positions) | "
             f"{f(f'{p}.prefix_bytes', ',d')} |",
             f"| ... of which linear-attention states (any length) | {f(f'{p}.prefix_fixed_bytes', ',d')} |",
             f"| ... per further position of the open segment | {f(f'{p}.prefix_bytes_per_position', ',.0f')} |",
             f"| segment-prefix cache at a segment's largest row | {f(f'{p}.prefix_worst_bytes', ',.0f')} |",
             f"| query-ready memory (the retriever over the full queue) | {f(f'{p}.ready_bytes', ',d')} |", ""]
    weights = ""
    if pr:
        weights = (f"; weights {_mib(pr['params'] * 4)} in float32, {_mib(pr['params'] * 2)} in bfloat16 "
                   f"({marker(PRECISION, pr, 'params', ',d')} parameters)")
    lines += [f"What the `auto` budgets hold (0.8B shape{weights}):", "",
              "| worker memory | each `auto` budget | open conversations in the prefix cache (typical / largest rows) "
              "| conversations with a query-ready memory |", "|---|---|---|---|"]
    for mem in WORKER_MEMORY:
        b = auto_cache_bytes(mem)
        lines.append(f"| {_mib(mem)} | {_mib(b)} | {b // q['prefix_bytes']:,} / {int(b // q['prefix_worst_bytes']):,} | "
                     f"{b // q['ready_bytes']:,} |")
    lines += ["", "Sizing rule: give the query-ready memory room for the conversations that are queried between "
              "their turns, and the prefix cache room for the conversations with an open segment that a worker "
              "serves at once (its partitions' active conversations). Below that, `evostream_query_cache_events_total"
              "{event=\"evict\"}` and the prefix cache's `evict` count rise and turns recompute what was evicted: the "
              "numbers stay exact, the work grows back towards the uncached figures (BENCHMARKS.md). The default "
              "configuration computes "
              + ", ".join(f"{marker(QUERY_CACHE, qc, f'default_work.{fam}.ratio', '.2f', 'x')} ({fam})"
                          for fam in qc.get("default_work", {}))
              + " of the model's minimum positions per turn once its caches hold the active conversations."]
    return lines


def cold_tier(extra: dict[str, Any], per_conv_disk: float | None) -> list[str]:
    ct = extra.get(COLD_TIER)
    if not ct:
        return ["Not measured yet: run `python -m benchmarks.capacity_cold_tier`."]
    f = _m(extra, COLD_TIER)
    lines = [f"`{f('run.command')}` ({f('run.date_utc')}): {f('conversations', ',d')} conversations of "
             f"{f('turns', 'd')} turns at hidden {f('hidden', 'd')} (float32 latents, "
             f"{f('payload_bytes_per_conversation', ',.0f')} bytes of payload each), frozen and thawed through "
             f"the real store and a local Valkey, files on {f('disk')}; host {f('run.cpu')}.", "",
             "| layout | shards | freezers x batches in flight | freeze, conversations/s | freeze, MiB/s | "
             "thaw, conversations/s | thaw, MiB/s | all restored |", "|---|---|---|---|---|---|---|---|"]
    for name in ct["layouts"]:
        p = f"layouts.{name}"
        lines.append(f"| {name} | {f(f'{p}.shards', 'd')} | {f(f'{p}.freezers', 'd')} x {f(f'{p}.concurrency', 'd')} | "
                     f"{f(f'{p}.freeze_per_s', ',.1f')} | {f(f'{p}.freeze_mib_per_s', ',.0f')} | "
                     f"{f(f'{p}.thaw_per_s', ',.1f')} | {f(f'{p}.thaw_mib_per_s', ',.0f')} | {f(f'{p}.all_thawed')} |")
    best = max(ct["layouts"].values(), key=lambda x: x["freeze_per_s"])
    single = ct["layouts"].get("single", best)
    payload = ct["payload_bytes_per_conversation"]
    disk = per_conv_disk or payload
    lines += ["",
              f"At these rates one freezer of the `single` layout needs {1e6 / single['freeze_per_s'] / 3600:,.1f} hours "
              f"per million conversations, the best layout here (`{best['name']}`) {1e6 / best['freeze_per_s'] / 3600:,.1f} "
              f"hours: {best['freeze_per_s'] / single['freeze_per_s']:.2f}x. On this 2-core machine Redis, the "
              "freezers and SQLite share the same cores, so parallel freezing barely helps here; what the shards "
              "buy on one host is fault isolation (a bad file quarantines 1/N of the frozen conversations, not "
              "all). Freezers on separate hosts, each with its own `--shards` range, are what the layout allows "
              "and this machine cannot measure. A thaw costs more than a freeze because the worker's load decodes "
              f"the restored state too. 10M frozen conversations of this shape hold {_tib(10e6 * disk)} "
              f"on disk (section 6: {_mib(disk)} each), while Redis keeps only their markers.", "",
              "### The path to 10M conversations",
              "",
              "A directory of SQLite shards serves one host (or a shared volume). For a fleet at 10M conversations "
              f"(about {_tib(10e6 * disk)} of frozen memory for this shape, {_tib(10e6 * disk / 2)} with bfloat16 storage) "
              "the seam is `stream/state/cold_store.py`: `put`, `get` and `delete` of whole records keyed by "
              "the conversation's tag, one shard at a time. Two backends fit it without changing the freeze/thaw "
              "protocol (the Lua scripts and the marker in Redis stay as they are):",
              "",
              "- **Object storage (S3, GCS, Azure Blob)**: one object per conversation at `<prefix>/<shard>/<tag>`, "
              "written whole with a conditional put, read whole on thaw, deleted after the thaw's script ran; "
              f"no server to run, cost per GB-month and per request. A thaw is one GET of the record ({_mib(disk)} "
              "here), paid by the first turn after idling (its latency is the store's, not measured here). "
              "Freezing parallelises by shard across freezer hosts.",
              "- **A database (PostgreSQL, Cassandra/Scylla)**: the table of `cold_store._SCHEMA` with the tag as "
              "primary key, partitioned by shard; many writers, backups and point-in-time recovery from the "
              "database's own tools.",
              "",
              "Either way the cold store must acknowledge a write durably before the freeze script deletes the "
              "Redis keys (the order that makes a crash harmless), and a missing or unreadable record must name "
              "the conversation so that it is quarantined, as a bad SQLite shard is today (its turns are "
              "dead-lettered `checkpoint_corrupt` and the worker goes on)."]
    return lines


def _tib(n: float) -> str:
    return f"{n / GIB / 1024:,.1f} TiB" if n >= GIB * 1024 else _mib(n)


def summary(extra: dict[str, Any]) -> list[str]:
    out = []
    qc, ct = extra.get(QUERY_CACHE), extra.get(COLD_TIER)
    if qc and SHAPE in qc["sizes"]:
        q = qc["sizes"][SHAPE]
        b = auto_cache_bytes(16 * GIB)
        out.append(f"- A worker also holds its caches: at the 0.8B shape an open conversation's segment-prefix entry "
                   f"is {_mib(q['prefix_bytes'])} (up to {_mib(q['prefix_worst_bytes'])}) and its query-ready memory "
                   f"{_mib(q['ready_bytes'])}; with 16 GiB per worker the `auto` budgets ({_mib(b)} each) hold "
                   f"{b // q['prefix_bytes']:,} and {b // q['ready_bytes']:,} of them (section 4b).")
    if ct:
        best = max(ct["layouts"].values(), key=lambda x: x["freeze_per_s"])
        out.append(f"- The cold tier freezes {best['freeze_per_s']:,.1f} conversations/s and thaws "
                   f"{best['thaw_per_s']:,.1f}/s on this machine with {best['shards']} shards "
                   f"({1e6 / best['freeze_per_s'] / 3600:,.1f} hours per million per freezer); section 8 gives the "
                   "path to object storage or a database for 10M conversations.")
    return out
