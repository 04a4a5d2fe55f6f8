"""The benchmark plots (issue 11): `benchmarks.plots` draws real PNG files from the results
files the benchmarks save, links them from a BENCHMARKS.md section, and refuses a results file
that is not what a benchmark writes. Small hand-made results, no benchmark run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from benchmarks import plots
from benchmarks.results_schema import (E2E_LOAD_FILE, ENGINE_HISTORY_FILE, ENGINE_PREFIX_CACHE_FILE, E2EPhase,
                                       E2ERun, EngineHistory, PrefixCacheSegment, RunInfo, TimedTurn,
                                       record_e2e_run, write_json)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(cmd: str) -> RunInfo:
    return RunInfo(command=cmd, date_utc="2026-11-30 12:00 UTC", machine="test machine, 2 CPUs")


def _phase(rate: float, p50: float, thr: float) -> E2EPhase:
    return E2EPhase(label="backlog" if rate == 0 else f"steady-{rate:g}", rate=rate, turns=40, turns_per_s=thr,
                    p50_ms=p50, p90_ms=2 * p50, p99_ms=3 * p50, max_ms=4 * p50, latencies_ms=[p50, 2 * p50])


def _write_results(d: Path) -> None:
    sweep = E2ERun(run=_run("python -m benchmarks.bench_e2e --rates 2,5,10"), section="End-to-end, latency vs load",
                   prefix_cache_bytes=0, conversations=4, turns_per_conversation=10, partitions=4,
                   phases=[_phase(0, 5000, 12.0), _phase(2, 80, 2.0), _phase(5, 120, 5.0), _phase(10, 900, 9.1)])
    record_e2e_run(sweep, d)
    one_rate = sweep.model_copy(update={"section": "End-to-end pipeline", "run": _run("python -m benchmarks.bench_e2e"),
                                        "phases": [_phase(0, 7000, 10.0), _phase(10, 150, 9.9)]})
    record_e2e_run(one_rate, d)
    streamed = [30.0 + (i % 16) * 3 + min(i, 32) for i in range(60)]
    write_json(EngineHistory(run=_run("python -m benchmarks.bench_engine --turns 61"), model="tiny: hidden 64",
                             segment_turns=16, queue_full_from_turn=32, streamed_ms=streamed,
                             incremental=[TimedTurn(turn=10, ms=30, reps=3), TimedTurn(turn=60, ms=44, reps=3)],
                             reread=[TimedTurn(turn=10, ms=29, reps=3), TimedTurn(turn=60, ms=250, reps=3)],
                             windows=[TimedTurn(turn=k, ms=40 + k, reps=3) for k in range(16)]),
               d / ENGINE_HISTORY_FILE)
    write_json(PrefixCacheSegment(run=_run("python -m benchmarks.bench_engine --only-cache"), model="tiny: hidden 64",
                                  family="qwen3", first_turn=32, queue_full=True, reps=3,
                                  uncached_ms=[33 + 3 * k for k in range(16)], cached_ms=[24.0] * 16,
                                  uncached_positions=[700 + 60 * k for k in range(16)], cached_positions=[670] * 16,
                                  minimum_positions=[670] * 16),
               d / ENGINE_PREFIX_CACHE_FILE)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return w, h


def test_plots_are_png_files_linked_from_the_benchmarks_section(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "docs" / "plots"
    _write_results(results)
    md = tmp_path / "docs" / "BENCHMARKS.md"
    md.parent.mkdir(parents=True)
    md.write_text("# Benchmarks\n\n## Engine\n\nkept as it was\n")

    assert plots.main(["--results-dir", str(results), "--out-dir", str(out), "--benchmarks-md", str(md)]) == 0

    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == sorted(f for f, *_ in plots.PLOTS)
    for p in pngs:
        w, h = _png_size(p)
        assert w >= 800 and h >= 400, (p.name, w, h)
        assert p.stat().st_size > 10_000, p.name  # axes, text and curves, not an empty canvas
    import matplotlib.image

    img = matplotlib.image.imread(out / "e2e_latency_vs_load.png")
    assert img.std() > 0.05  # something was drawn on the white background
    text = md.read_text()
    assert "## Engine\n\nkept as it was" in text
    assert "## Plots" in text
    for p in pngs:
        assert f"(plots/{p.name})" in text  # relative to BENCHMARKS.md, so it renders on a forge
    assert "python -m benchmarks.bench_e2e --rates 2,5,10" in text  # the data's command is named


def test_missing_results_skip_their_plot_and_say_so(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_results(results)
    (results / ENGINE_HISTORY_FILE).unlink()
    md = tmp_path / "BENCHMARKS.md"
    assert plots.main(["--results-dir", str(results), "--out-dir", str(tmp_path / "plots"),
                       "--benchmarks-md", str(md)]) == 0
    assert not (tmp_path / "plots" / "engine_ms_per_turn_by_history.png").exists()
    assert (tmp_path / "plots" / "e2e_latency_vs_load.png").exists()
    assert "Not drawn: no " in md.read_text()


def test_a_malformed_results_file_is_an_error_not_a_wrong_curve(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    _write_results(results)
    bad = json.loads((results / ENGINE_PREFIX_CACHE_FILE).read_text())
    del bad["cached_ms"]
    (results / ENGINE_PREFIX_CACHE_FILE).write_text(json.dumps(bad))
    md = tmp_path / "BENCHMARKS.md"
    assert plots.main(["--results-dir", str(results), "--out-dir", str(tmp_path / "plots"),
                       "--benchmarks-md", str(md)]) == 2
    assert ENGINE_PREFIX_CACHE_FILE in capsys.readouterr().err
    assert not md.exists()


def test_e2e_runs_of_different_sections_are_kept_side_by_side(tmp_path: Path) -> None:
    _write_results(tmp_path)
    from benchmarks.results_schema import E2EResults

    res = E2EResults.model_validate_json((tmp_path / E2E_LOAD_FILE).read_text())
    assert set(res.runs) == {"End-to-end, latency vs load", "End-to-end pipeline"}
    rerun = res.runs["End-to-end pipeline"].model_copy(update={"phases": [_phase(0, 1, 1.0)]})
    record_e2e_run(rerun, tmp_path)  # the same section again replaces only its own run
    res = E2EResults.model_validate_json((tmp_path / E2E_LOAD_FILE).read_text())
    assert len(res.runs["End-to-end pipeline"].phases) == 1
    assert len(res.runs["End-to-end, latency vs load"].phases) == 4


@pytest.mark.parametrize("missing", [E2E_LOAD_FILE, ENGINE_HISTORY_FILE, ENGINE_PREFIX_CACHE_FILE])
def test_each_plot_draws_on_its_own(tmp_path: Path, missing: str) -> None:
    results = tmp_path / "results"
    _write_results(results)
    (results / missing).unlink()
    figs = plots.render(results, tmp_path / "plots")
    drawn = {f.file for f in figs if f.path}
    assert len(drawn) == 2
    for f in drawn:
        _png_size(tmp_path / "plots" / f)


def test_e2e_plot_draws_only_what_was_measured_and_names_model_and_machine(tmp_path: Path, monkeypatch) -> None:
    """Issue #18 item 7: the plot drew the backlog's drain rate as a capacity line (95 turns/s
    while its own throughput panel saturated near 52), did not say the model was the tiny one,
    and showed "issue 11" in a legend."""
    from benchmarks.results_schema import E2EResults

    sweep = E2ERun(run=RunInfo(command="python -m benchmarks.bench_e2e --rates 4,8,64", date_utc="2026-11-30 12:00 UTC",
                               machine="AMD EPYC 9B14, 2 CPUs"),
                   section="End-to-end, latency vs load (issue 11)", prefix_cache_bytes=0, conversations=16,
                   turns_per_conversation=8, partitions=4,
                   phases=[_phase(0, 900, 94.7), _phase(4, 80, 4.0), _phase(8, 90, 8.0), _phase(64, 5000, 52.0)])
    record_e2e_run(sweep, tmp_path)
    res = E2EResults.model_validate_json((tmp_path / E2E_LOAD_FILE).read_text())
    captured = {}

    def keep(fig, path, n):  # the figure as drawn, instead of a file
        captured["fig"] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_latency_vs_load(res, tmp_path / "x.png", "results/e2e_load.json")
    fig = captured["fig"]
    steady = [p for p in sweep.phases if p.rate > 0]
    measured_y = {p.p50_ms for p in steady} | {p.p99_ms for p in steady} | {p.turns_per_s for p in steady}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() == "achieved = offered":  # the reference diagonal, not data
                continue
            ys = {round(float(y), 6) for y in line.get_ydata()}
            assert ys <= {round(v, 6) for v in measured_y}, (ax.get_title(), line.get_label(), ys)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    texts += [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()] + [legend.get_title().get_text()]
    texts += [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    every = "\n".join(texts)
    assert "issue" not in every.lower(), every
    assert "capacity" not in every.lower(), every
    assert "tiny" in every and "AMD EPYC 9B14" in every, every
    assert "94.7" in every  # the backlog's drain rate is reported as what it is, in words
