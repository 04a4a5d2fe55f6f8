"""scripts/chaos_report.py renders RELIABILITY.md from the chaos ledgers only (issue #20): every
number of a run is a figure marker into the results file it writes, the totals are sums of
the ledgers, byte-different duplicates fail the result, the system's own counters are labelled
as such, and expiry is reported where a scenario runs it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from benchmarks import figures

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("chaos_report", REPO / "scripts" / "chaos_report.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _line(scenario: str, **kw) -> dict:
    base = dict(scenario=scenario, scale="short", run_id="r1", ok=True, turns=100, conversations=10, records=100,
                applied=100, started_at=f"2026-12-02T03:0{len(scenario) % 10}:00+00:00", machine="m", command="c",
                states_checked=10, turns_in_checked_checkpoints=100, seconds=60.0,
                system_counters={"evostream_checkpoint_conflicts_total": 3.0}, extra={"restarts": 2})
    base.update(kw)
    return base


def _run(tmp_path: Path, lines: list[dict]) -> tuple[str, dict, list[str]]:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, results = tmp_path / "RELIABILITY.md", tmp_path / "results"
    assert _module().main(["--input", str(src), "--output", str(out), "--results-dir", str(results)]) == 0
    text = out.read_text()
    data = json.loads((results / "chaos_short.json").read_text())
    return text, data, figures.check(("RELIABILITY.md",), tmp_path, results)


def test_every_run_number_is_a_marker_into_the_ledgers(tmp_path: Path) -> None:
    lines = [_line("kill9", kills=9, kills_by_point={"in_step": 3, "external": 6}, duplicates_byte_identical=4),
             _line("hostile_input", applied=90, dead_lettered={"schema_invalid": 7, "invalid_json": 3}, hostile=10,
                   records=110),
             _line("memory_ttl", states_checked=0, turns_in_checked_checkpoints=0, expired=10)]
    text, data, problems = _run(tmp_path, lines)
    assert problems == []
    t = data["totals"]
    assert (t["turns"], t["applied"], t["dead_lettered_total"], t["expired"], t["kills"]) == (300, 290, 10, 10, 9)
    assert t["turns_in_checked_checkpoints"] == 200 and t["duplicates_byte_identical"] == 4
    assert data["scenarios"]["hostile_input"]["dead_lettered_by_reason"] == "schema_invalid: 7, invalid_json: 3"
    assert "system counter" in text and "evostream_checkpoint_conflicts_total" in text
    # outside the markers, the sections about this run carry no digits (issue/setting references
    # and the prose of the scenarios are words; the timeline and problems are markers too)
    run_part = text.split("## Found on the way")[0]
    bare = re.sub(r"<!--fig .*?<!--/fig-->", "", run_part, flags=re.S)
    bare = re.sub(r"<!--.*?-->", "", bare, flags=re.S)
    bare = re.sub(r"`[^`]*`", "", bare)
    bare = re.sub(r"issue #\d+|#\d+\)|1e-4|\b1 -> 3 -> 2\b|every 3 turns|\(\d+\)", "", bare)
    for para in bare.split("\n\n"):
        if para.startswith("#"):
            continue  # headings: the fixed titles of the sections and scenarios
        if para.startswith(("Two tenants", "Worker processes", "Workers join", "Redis is taken", "Hypothesis",
                            "Many idle", "A broker", "One of two")):
            continue  # the fixed descriptions of what each scenario does
        assert not re.search(r"\d", para), para[:300]


def test_byte_different_duplicates_fail_the_result_and_are_counted_apart(tmp_path: Path) -> None:
    lines = [_line("rebalance_zombie", ok=False, duplicates=3, duplicates_byte_identical=2,
                   duplicates_byte_different=1, problems=["1 keys whose copies differ"])]
    text, data, problems = _run(tmp_path, lines)
    assert problems == []
    s = data["scenarios"]["rebalance_zombie"]
    assert (s["duplicates_byte_identical"], s["duplicates_byte_different"], s["result"]) == (2, 1, "FAIL")
    assert data["run"]["result"] == "FAILURES (see below)"
    assert "1 keys whose copies differ" in text


def test_a_figure_edited_by_hand_is_caught(tmp_path: Path) -> None:
    text, _, _ = _run(tmp_path, [_line("kill9", kills=9)])
    edited = text.replace(">9<!--/fig-->", ">8<!--/fig-->", 1)
    assert edited != text
    (tmp_path / "RELIABILITY.md").write_text(edited)
    problems = figures.check(("RELIABILITY.md",), tmp_path, tmp_path / "results")
    assert problems and "'8'" in problems[0] and "'9'" in problems[0]
