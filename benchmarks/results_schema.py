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

    @classmethod
    def now(cls, command: str) -> "RunInfo":
        return cls(command=command, date_utc=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   machine=f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}")


def cpu_model() -> str:
    """The CPU's model name (host-dependent figures name the host), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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


#: bench_e2e has only ever run the seeded tiny checkpoint; files written before the `model`
#: field existed are that model.
E2E_TINY_MODEL = "seeded tiny qwen3 checkpoint (hidden 64, 4 layers), CPU float32"


class E2ERun(BaseModel):
    run: RunInfo
    section: str
    model: str = E2E_TINY_MODEL
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
