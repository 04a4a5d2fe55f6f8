"""Figures in the documents are rendered from the results files that produced them
(benchmarks/figures.py): a figure that drifts from its file, or is edited by hand, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import figures

REPO = Path(__file__).resolve().parents[1]


def test_every_marked_figure_equals_its_results_file() -> None:
    problems = figures.check()
    assert not problems, "\n".join(problems)


def _fake_repo(tmp_path: Path, doc: str) -> tuple[Path, Path]:
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps({"runs": {"a.b": {"p99_ms": 21.456, "label": "tiny"}}, "xs": [1.5, 2.25]}))
    (tmp_path / "README.md").write_text(doc)
    return tmp_path, results


def test_one_digit_changed_by_hand_is_caught(tmp_path: Path) -> None:
    ok = 'p99 <!--fig r.json:runs."a.b".p99_ms:.1f|ms-->21.5ms<!--/fig--> on <!--fig r.json:runs."a.b".label-->tiny<!--/fig-->'
    repo, results = _fake_repo(tmp_path, ok)
    assert figures.check(("README.md",), repo, results) == []
    (repo / "README.md").write_text(ok.replace("21.5ms", "21.6ms"))
    (problem,) = figures.check(("README.md",), repo, results)
    assert "'21.6ms'" in problem and "'21.5ms'" in problem


def test_render_rewrites_from_the_file_and_missing_sources_are_named(tmp_path: Path) -> None:
    repo, results = _fake_repo(tmp_path, "x <!--fig r.json:xs.1:.2f|x-->9.99x<!--/fig--> y <!--fig r.json:xs.7-->1<!--/fig-->")
    with pytest.raises(figures.FigureError, match="no index '7'"):
        figures.render(("README.md",), repo, results)
    (repo / "README.md").write_text("x <!--fig r.json:xs.1:.2f|x-->9.99x<!--/fig--> <!--fig gone.json:a-->1<!--/fig-->")
    problems = figures.check(("README.md",), repo, results)
    assert any("'9.99x'" in p and "'2.25x'" in p for p in problems)
    assert any("gone.json" in p and "does not exist" in p for p in problems)


def test_markers_without_a_format_next_to_each_other(tmp_path: Path) -> None:
    """A path stops at the marker's end: two unformatted markers on one line are two figures
    (a greedy path once swallowed the text of the first one and the start of the second)."""
    repo, results = _fake_repo(tmp_path, 'a <!--fig r.json:runs."a.b".label-->tiny<!--/fig--> b '
                                         '<!--fig r.json:xs.0-->1.5<!--/fig-->\n')
    assert [f.path for f in figures.figures("README.md", (repo / "README.md").read_text())] == ['runs."a.b".label', "xs.0"]
    assert figures.check(("README.md",), repo, results) == []


def test_readme_figure_values_are_all_markers() -> None:
    """README's headline figures are rendered from results files: a value typed into the
    Figures table (instead of a marker) fails here; one edited inside a marker fails above.
    (The first column says what is measured, with its inputs: turn 500, 64 conversations.)"""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Figures\n")
    section = text[start:text.find("\n## ", start + 5)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) >= 8
    for row in rows:
        value = row.split(" | ")[1]
        assert "<!--fig " in value, row
        bare = re.sub(r"<!--fig .*?<!--/fig-->|`[^`]*`", "", value)
        assert not re.search(r"\d", bare), f"a number typed into README's Figures table: {row}"
