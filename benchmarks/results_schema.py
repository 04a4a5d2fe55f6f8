"""The raw series the benchmarks save for the plots (issue 11).

The benchmarks print tables; the plots need the series behind them (one value per turn, per
position, per offered rate). These pydantic models are the contract between the two sides:
a benchmark writes one of them as JSON under `benchmarks/results/`, `benchmarks.plots` reads it
back and fails loudly on a file that does not match, instead of drawing a wrong curve.
Every file carries the command and the date of the run that produced it, so a plot can say
where its numbers come from.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

from pydantic import BaseModel, Field

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENGINE_HISTORY_FILE = "engine_history.json"
ENGINE_PREFIX_CACHE_FILE = "engine_prefix_cache.json"
E2E_LOAD_FILE = "e2e_load.json"


class RunInfo(BaseModel):
    """Where a series comes from: the command, when, on what."""

    command: str
    date_utc: str
    machine: str
    cpu: str = Field("", description="the host's CPU model, flags and torch's kernel level (issue #22: "
                                     "CPU figures name their host)")

    @classmethod
    def now(cls, command: str) -> "RunInfo":
        from workers.precision import cpu_facts

        return cls(command=command, date_utc=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   machine=f"{platform.platform()}, {os.cpu_count()} CPUs", cpu=cpu_facts().describe())


class TimedTurn(BaseModel):
    """One timed turn of the long conversation: its index (= turns of history before it) and
    the median of `reps` timings."""

    turn: int
    ms: float
    reps: int


class EngineHistory(BaseModel):
    """bench_engine (a): ms per turn by history length, one conversation, no prefix cache."""

    run: RunInfo
    model: str
    segment_turns: int
    queue_full_from_turn: int
    streamed_ms: list[float] = Field(description="one step per turn while streaming turns 0..n-1 (single timing each)")
    incremental: list[TimedTurn] = Field(description="engine.step on the live state, median of repetitions")
    reread: list[TimedTurn] = Field(description="the reference re-reading turns 0..N, median of repetitions")
    windows: list[TimedTurn] = Field(default_factory=list,
                                     description="every turn of whole segments, median of repetitions")


class PrefixCacheSegment(BaseModel):
    """bench_engine (d): ms per turn and positions computed by position in one segment, without
    and with the segment-prefix cache, from the same state."""

    run: RunInfo
    model: str
    family: str
    first_turn: int
    queue_full: bool
    reps: int
    uncached_ms: list[float]
    cached_ms: list[float]
    uncached_positions: list[int]
    cached_positions: list[int]
    minimum_positions: list[int]


class E2EPhase(BaseModel):
    """One phase of bench_e2e: a backlog (rate 0) or turns produced at `rate` turns/s."""

    label: str
    rate: float
    turns: int
    turns_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    latencies_ms: list[float] = Field(default_factory=list, description="turn record -> first embedding record")


class E2ERun(BaseModel):
    run: RunInfo
    section: str
    prefix_cache_bytes: int
    conversations: int
    turns_per_conversation: int
    partitions: int
    phases: list[E2EPhase]


class E2EResults(BaseModel):
    """bench_e2e runs by BENCHMARKS.md section: each section's latest run, so the runs of
    different sections (prefix cache on/off, the load sweep) sit side by side."""

    runs: dict[str, E2ERun] = Field(default_factory=dict)


def write_json(model: BaseModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(model.model_dump_json(indent=1) + "\n")
    tmp.replace(path)  # a half-written file never replaces a good one
    return path


def record_e2e_run(run: E2ERun, results_dir: Path = RESULTS_DIR) -> Path:
    """Add (or replace) this section's run in the e2e results file."""
    path = results_dir / E2E_LOAD_FILE
    res = E2EResults.model_validate_json(path.read_text()) if path.exists() else E2EResults()
    res.runs[run.section] = run
    return write_json(res, path)


QUERY_CACHE_FILE = "query_cache.json"


class QueryCacheSize(BaseModel):
    """bench_query_cache at one model size: queries and one continuing turn against a full queue,
    with and without the query-ready memory (issue #22), interleaved in one run."""

    model: str
    family: str
    dtype: str
    threads: int
    queue_len: int
    ready_point: int = Field(description="queue positions the query-ready memory covers (Qwen3.5: its 64-grid)")
    query_tokens: float = Field(description="mean own tokens of a query (instruction included)")
    positions_per_query_cached: float
    positions_per_query_uncached: float
    positions_ratio_cached: float = Field(description="positions computed / the query's own tokens")
    positions_ratio_uncached: float
    query_ms_cached: float = Field(description="one query per pass, median")
    query_ms_uncached: float
    single_query_speedup: float
    batch: int
    batch_ms_cached: float = Field(description="`batch` queries (one per conversation) in one pass, median")
    batch_ms_uncached: float
    queries_per_s_cached: float
    queries_per_s_uncached: float
    throughput_ratio: float = Field(description="queries/s cached / uncached, batched passes")
    query_max_diff: float
    turn_ms_cached: float = Field(description="a continuing turn: prefix cache + query-ready memory (ready pass included)")
    turn_ms_uncached: float = Field(description="the same turn, the plain path (no cache)")
    turn_ms_prefix_only: float = Field(description="the same turn, prefix cache only (before issue #22)")
    turn_positions_cached: int
    turn_positions_uncached: int
    turn_positions_prefix_only: int
    ready_positions: int
    turn_max_diff: float
    ready_bytes: int
    conversations_per_gib: int
    prefix_bytes: int = Field(description="the segment-prefix cache entry after the continuing turn")
    prefix_positions: int
    prefix_fixed_bytes: int = Field(description="linear-attention states: independent of the prefix length")
    prefix_bytes_per_position: float
    prefix_worst_bytes: float = Field(description="at a segment's largest memory row (C + 2048 + 16 L positions)")


class WorkRatio(BaseModel):
    """Positions computed over a full-queue 16-turn segment / the model minimum (bench_engine's
    definition), by an engine configured as a worker with default settings."""

    family: str
    prefix_cache_bytes: int
    query_cache_bytes: int
    turns: str
    minimum: int
    computed: int
    ratio: float


class QueryCacheResults(BaseModel):
    run: RunInfo
    sizes: dict[str, QueryCacheSize]
    default_work: dict[str, WorkRatio] = Field(default_factory=dict)


PRECISION_FILE = "precision.json"


class DtypeTiming(BaseModel):
    """One compute dtype at one model size: a continuing turn and a query, timed on this host."""

    dtype: str
    first_turn_ms: float = Field(description="a segment's first turn (re-reads the 512-latent snapshot)")
    turn_ms: float = Field(description="a continuing turn (both caches on, as a default worker), median")
    turn_ms_all: list[float]
    segment_turn_ms: float = Field(description="mean ms per turn over a 16-turn segment: (first + 15 x continuing) / 16")
    turns_per_s: float = Field(description="one worker, one conversation at a time: 1000 / segment_turn_ms")
    query_ms: float = Field(description="one query against a full queue (no query cache), median")
    positions_per_turn: int


class PrecisionResults(BaseModel):
    """bench_precision: which compute dtype is faster on this CPU, which kernels ran, and what
    bfloat16 storage does to the numbers (issue #22)."""

    run: RunInfo
    model: str
    params: int = Field(description="parameters of the model (weights: x4 bytes in float32, x2 in bfloat16)")
    torch_capability: str
    cpu_flags: list[str]
    onednn_bf16_matmul: str = Field(description="oneDNN's name of the bf16 matmul implementation that ran")
    probe_fp32_ms: float
    probe_bf16_ms: float
    probe_ratio: float = Field(description="bf16 / fp32 time of the start-up probe (layer-0 matmuls)")
    probe_choice: str
    timings: dict[str, DtypeTiming]
    bf16_over_fp32_turn: float = Field(description="whole continuing turn, bf16 time / fp32 time")
    bf16_over_fp32_query: float
    faster: str = Field(description="the compute dtype measured faster on this host (segment turn)")
    bf16_compute_cosine_min: float = Field(description="turn + query embeddings, bf16 compute vs fp32 compute")
    storage_turns: int
    storage_reload_max_diff: float = Field(description="bf16 storage, fp32 compute: embeddings with a reload from "
                                                       "the stored bytes after every turn vs never reloading")
    storage_cosine_min: float = Field(description="bf16 storage vs float32 storage, every turn's embedding")
    storage_roundtrip_exact: bool = Field(description="in-memory latents == latents read back from the stored bytes")


QUERY_API_FILE = "query_api.json"


class QueryApiRun(BaseModel):
    """bench_query against one worker configuration (tiny checkpoint, local stack)."""

    query_cache_bytes: int
    latency_idle_p50_ms: float
    latency_idle_p99_ms: float
    latency_idle_ok: int
    latency_idle_n: int
    baseline_turns_per_s: float = Field(description="mean of the backlog runs before and after the flood")
    baseline_spread: float = Field(description="the two baseline runs' ratio: the machine's noise during the run")
    flood_turns_per_s: float
    flood_over_baseline: float
    flood_answered: int = Field(description="requests answered 200 during the flood (4 queries each)")
    flood_requests_per_s: float
    flood_p50_ms: float
    flood_p99_ms: float = Field(description="query p99 while a backlog is being ingested")
    flood_codes: dict[str, int]


class QueryApiResults(BaseModel):
    run: RunInfo
    qps: float
    seconds: float
    flood_clients: int
    backlog_turns: int
    runs: dict[str, QueryApiRun]
