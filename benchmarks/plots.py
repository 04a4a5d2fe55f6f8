"""Draw the benchmarks' curves as PNG files and link them from BENCHMARKS.md.

The tables in BENCHMARKS.md give a few points; a curve shows the shape a table hides: where
latency turns up as the offered load nears what one worker drains, how a turn's cost grows
with the conversation's history (or does not), and the saw-tooth of the open segment that the
prefix cache flattens. Nothing is measured here: the plots are drawn from the series the
benchmarks saved under benchmarks/results/ (see benchmarks/results_schema.py), and each figure's
footnote names the command and date of its data.

Run:  .venv/bin/python -m benchmarks.plots      (`make bench-plots`; `make bench` runs it last)
Writes benchmarks/plots/*.png and the "Plots" section of BENCHMARKS.md. A missing results file
skips its plot (said in the section); a results file that does not match its schema is an error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402
from pydantic import BaseModel, ValidationError  # noqa: E402

from benchmarks.report import update_section  # noqa: E402
from benchmarks.results_schema import (E2E_LOAD_FILE, ENGINE_HISTORY_FILE, ENGINE_PREFIX_CACHE_FILE,  # noqa: E402
                                       RESULTS_DIR, E2EResults, EngineHistory, PrefixCacheSegment, RunInfo)

REPO = Path(__file__).resolve().parents[1]
PLOTS_DIR = REPO / "benchmarks" / "plots"
SECTION = "Plots"
DPI = 110


@dataclass
class Figure:
    """One plot: its file, what it shows, where its data came from (or why it was not drawn)."""

    file: str
    title: str
    results: str
    regenerate: str
    sources: list[RunInfo]
    path: Path | None = None  # None: not drawn
    skipped: str = ""


class ResultsError(Exception):
    """A results file exists but is not what its benchmark writes."""


def _load(path: Path, model: type[BaseModel]):
    if not path.exists():
        return None
    try:
        return model.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as e:
        raise ResultsError(f"{path}: not a {model.__name__} results file ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0]})") from e


def _footnote(fig, sources: list[RunInfo], results: str, model: str = "") -> int:
    """Provenance under the axes: the data file, the command and date of each run (and the
    model). Returns the number of lines, for the layout."""
    lines = [f"data: {results}" + (f"; model: {model}" if model else "")]
    lines += [f"{s.command}  ({s.date_utc}; {s.machine})" for s in sources]
    text = "\n".join(textwrap.fill(line, 170, subsequent_indent="    ") for line in lines)
    fig.text(0.01, 0.01, text, fontsize=6.5, color="0.35", va="bottom", ha="left", family="monospace")
    return text.count("\n") + 1


def _plain_log_axis(ax, top: float | None = None) -> None:
    """Log scale with plain numbers (80, 200, 1000), not powers of ten; `top` leaves room for
    a legend above the data."""
    ax.set_yscale("log")
    if top:
        ax.set_ylim(top=top)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _save(fig, path: Path, n_foot_lines: int) -> Path:
    fig.tight_layout(rect=(0, 0.01 + 0.024 * n_foot_lines, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
def _section_label(section: str) -> str:
    """A BENCHMARKS.md section name as a reader of the plot needs it (no tracker references)."""
    return re.sub(r"\s*\((?:issue|#)\s*\d+\)", "", section).strip()


def plot_latency_vs_load(res: E2EResults, path: Path, results: str) -> list[RunInfo]:
    """End to end: p50/p99 of turn -> embedding latency at each offered rate, and the rate the
    worker achieved, one colour per run (section of BENCHMARKS.md). Only the steady phases are
    drawn: the backlog phase (a queue of turns drained in large batches) has no offered rate
    and is not a sustained rate, so it is reported in words, not drawn as a line (issue
    #18: a "capacity" line at the backlog's 95 turns/s sat above the 52 the steady phases
    reached)."""
    runs = sorted((r for r in res.runs.values() if any(p.rate > 0 for p in r.phases)), key=lambda r: r.run.date_utc)
    if not runs:
        raise ResultsError(f"{results}: no run with a steady phase (rate > 0)")
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 5.6), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = 0.0
    worst = max(p.p99_ms for r in runs for p in r.phases if p.rate > 0)
    backlog_notes = []
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        steady = sorted((p for p in run.phases if p.rate > 0), key=lambda p: p.rate)
        rates = [p.rate for p in steady]
        label = (f"{_section_label(run.section)}: {run.conversations} x {run.turns_per_conversation} turns, "
                 f"prefix cache {'on' if run.prefix_cache_bytes else 'off'} ({run.run.date_utc})")
        ax_lat.plot(rates, [p.p50_ms for p in steady], "-o", color=c, label=label)
        ax_lat.plot(rates, [p.p99_ms for p in steady], "--s", color=c, alpha=0.8)
        ax_thr.plot(rates, [p.turns_per_s for p in steady], "-o", color=c, label=f"run {i + 1}")
        top = max(top, *rates, *(p.turns_per_s for p in steady))
        for p in run.phases:
            if p.rate == 0:
                backlog_notes.append(f"run {i + 1}: a backlog of {p.turns} turns drained at {p.turns_per_s:.1f} "
                                     "turns/s (large batches, no offered rate: not a sustained rate)")
    _plain_log_axis(ax_lat, top=worst * (2.5 + 0.6 * len(runs)))  # headroom: the legend sits above the curves
    ax_lat.set_xlabel("offered load (turns/s produced at a steady rate)")
    ax_lat.set_ylabel("latency, turn record -> embedding record (ms, log scale)")
    ax_lat.set_title("Latency vs offered load")
    ax_lat.grid(True, which="both", alpha=0.3)
    runs_legend = ax_lat.legend(loc="upper left", fontsize=7, title="run (BENCHMARKS.md section)", title_fontsize=7)
    ax_lat.add_artist(runs_legend)
    ax_lat.legend(handles=[Line2D([], [], color="0.3", ls="-", marker="o", label="p50"),
                           Line2D([], [], color="0.3", ls="--", marker="s", label="p99")],
                  loc="lower right", fontsize=7)
    lim = top * 1.1
    ax_thr.plot([0, lim], [0, lim], color="0.6", lw=0.8, label="achieved = offered")
    ax_thr.set_xlim(0, lim)
    ax_thr.set_ylim(0, lim)
    ax_thr.set_xlabel("offered load (turns/s)")
    ax_thr.set_ylabel("achieved (turns/s embedded)")
    ax_thr.set_title("Throughput at each steady rate")
    ax_thr.grid(True, alpha=0.3)
    ax_thr.legend(loc="upper left", fontsize=7)
    if backlog_notes:
        ax_thr.text(0.98, 0.02, "\n".join(textwrap.fill(n, 48) for n in backlog_notes), transform=ax_thr.transAxes,
                    ha="right", va="bottom", fontsize=6.5, color="0.3")
    models = sorted({r.model for r in runs})
    machines = sorted({f"{r.run.cpu} ({r.run.machine})" if r.run.cpu else r.run.machine for r in runs})
    fig.suptitle(f"End to end, one worker: model {'; '.join(models)}; machine {'; '.join(machines)}",
                 fontsize=9)
    sources = [r.run for r in runs]
    _save(fig, path, _footnote(fig, sources, results, "; ".join(models)))
    return sources


def plot_ms_by_history(h: EngineHistory, path: Path, results: str) -> list[RunInfo]:
    """Engine: ms per turn against the turns of history before it, incremental vs the
    reference's re-read of the whole history."""
    fig, ax = plt.subplots(figsize=(11, 5.6))
    streamed = np.asarray(h.streamed_ms, dtype=float)
    if streamed.size:
        x = np.arange(streamed.size)
        ax.plot(x, streamed, color="tab:blue", lw=0.6, alpha=0.35,
                label="incremental step, every turn once while streaming")
        seg = max(1, h.segment_turns)
        if streamed.size >= seg:
            mean = np.convolve(streamed, np.ones(seg) / seg, mode="valid")
            ax.plot(np.arange(seg - 1, streamed.size), mean, color="tab:blue", lw=2,
                    label=f"incremental, mean over the last {seg} turns (one segment)")
    ax.plot([t.turn for t in h.incremental], [t.ms for t in h.incremental], "o", color="navy", ms=8, mfc="white",
            mew=2, label=f"incremental, timed turns, median of {max(t.reps for t in h.incremental)} "
                          "(each at its own position in a segment)")
    if h.reread:
        ax.plot([t.turn for t in h.reread], [t.ms for t in h.reread], "-D", color="tab:red", ms=7,
                label=f"reference: re-read the whole history, median of {max(t.reps for t in h.reread)}")
    ax.axvline(h.queue_full_from_turn, color="0.4", ls=":", lw=1)
    ax.text(h.queue_full_from_turn, 0.98, f" memory queue full (turn {h.queue_full_from_turn})",
            transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="0.3")
    _plain_log_axis(ax)
    ax.set_xlabel("turns of history before the turn (turn index in the conversation)")
    ax.set_ylabel("ms per turn (log scale)")
    ax.set_title("Engine: cost of one turn by history length (one conversation, no prefix cache)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path, _footnote(fig, [h.run], results, h.model))
    return [h.run]


def plot_ms_by_segment_position(s: PrefixCacheSegment, path: Path, results: str) -> list[RunInfo]:
    """Engine: ms and positions computed by a turn's position in its segment, without and with
    the segment-prefix cache, from the same state."""
    fig, (ax_ms, ax_pos) = plt.subplots(1, 2, figsize=(12, 5.2))
    pos = np.arange(1, len(s.uncached_ms) + 1)
    span = f"turns {s.first_turn}-{s.first_turn + len(pos) - 1}, queue {'full' if s.queue_full else 'filling'}"
    ax_ms.plot(pos, s.uncached_ms, "-o", color="tab:red", label="without prefix cache (re-reads the open segment)")
    ax_ms.plot(pos, s.cached_ms, "-o", color="tab:green", label="with the segment-prefix cache")
    ax_ms.set_ylim(bottom=0)
    ax_ms.set_xlabel("position of the turn in its segment")
    ax_ms.set_ylabel(f"ms per turn (median of {s.reps})")
    ax_ms.set_title(f"Engine ({s.family}): ms per turn in a segment")
    ax_pos.plot(pos, s.minimum_positions, "-", color="0.5", lw=6, alpha=0.35, label="the model's minimum")
    ax_pos.plot(pos, s.uncached_positions, "-o", color="tab:red", label="without prefix cache")
    ax_pos.plot(pos, s.cached_positions, "-o", color="tab:green", label="with the segment-prefix cache")
    ax_pos.set_ylim(bottom=0)
    ax_pos.set_xlabel("position of the turn in its segment")
    ax_pos.set_ylabel("positions computed by the step (tokens)")
    ax_pos.set_title(f"Work per turn ({span})")
    for ax in (ax_ms, ax_pos):
        ax.set_xticks(pos)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, path, _footnote(fig, [s.run], results, s.model))
    return [s.run]


# --------------------------------------------------------------------------------------------
PLOTS = [
    ("e2e_latency_vs_load.png", "End to end: latency vs offered load", E2E_LOAD_FILE, E2EResults,
     plot_latency_vs_load,
     "`.venv/bin/python -m benchmarks.bench_e2e --rates ...` (`make bench-e2e-load`); any bench_e2e run adds its section"),
    ("engine_ms_per_turn_by_history.png", "Engine: ms per turn by history length", ENGINE_HISTORY_FILE,
     EngineHistory, plot_ms_by_history, "`make bench-engine`"),
    ("engine_ms_per_turn_by_segment_position.png", "Engine: ms per turn by position in a segment, prefix cache off/on",
     ENGINE_PREFIX_CACHE_FILE, PrefixCacheSegment, plot_ms_by_segment_position,
     "`make bench-engine` or `.venv/bin/python -m benchmarks.bench_engine --only-cache`"),
]


def render(results_dir: Path = RESULTS_DIR, out_dir: Path = PLOTS_DIR) -> list[Figure]:
    """Draw every plot whose results file exists; raise ResultsError on a malformed one."""
    figures = []
    for file, title, results_file, model, draw, regenerate in PLOTS:
        rpath = results_dir / results_file
        shown = _rel(rpath, REPO)
        fig = Figure(file=file, title=title, results=shown, regenerate=regenerate, sources=[])
        data = _load(rpath, model)
        if data is None:
            fig.skipped = f"no {shown} yet"
        else:
            fig.sources = draw(data, out_dir / file, shown)
            fig.path = out_dir / file
        figures.append(fig)
    return figures


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive
        return str(path)


def section_body(figures: list[Figure], md_dir: Path) -> str:
    lines = ["Drawn by `.venv/bin/python -m benchmarks.plots` (`make bench-plots`; `make bench` runs it after the "
             "benchmarks) from the series the benchmarks save under `benchmarks/results/`; nothing is measured by the "
             "plot script. Each figure's footnote names the command and date of its data, as below.", ""]
    for f in figures:
        lines.append(f"### {f.title}")
        lines.append("")
        if f.path is None:
            lines.append(f"Not drawn: {f.skipped} (run {f.regenerate}).")
        else:
            lines.append(f"![{f.title}]({_rel(f.path, md_dir)})")
            lines.append("")
            lines.append(f"Data `{f.results}`, from " + "; ".join(f"`{s.command}` ({s.date_utc})" for s in f.sources)
                         + f". Refresh: {f.regenerate}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out-dir", type=Path, default=PLOTS_DIR, help="where the PNG files go")
    ap.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md",
                    help="the file whose 'Plots' section links them")
    ap.add_argument("--no-write", action="store_true", help="draw the PNGs but leave BENCHMARKS.md alone")
    a = ap.parse_args(argv)
    try:
        figures = render(a.results_dir, a.out_dir)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in figures:
        print(f"wrote {f.path}" if f.path else f"skipped {f.file}: {f.skipped}", file=sys.stderr)
    if not a.no_write:
        update_section(a.benchmarks_md, SECTION, section_body(figures, a.benchmarks_md.parent))
    return 0 if any(f.path for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
