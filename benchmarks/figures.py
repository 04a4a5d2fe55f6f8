"""One source for every figure in the documents: the results files the runs wrote.

A figure in README.md, BENCHMARKS.md, RELIABILITY.md or docs/*.md is written between two
HTML comments that name where it comes from (markdown renders neither comment):

    <!--fig e2e_load.json:runs.backlog.phases.0.turns_per_s:.1f-->52.3<!--/fig-->

* `e2e_load.json` is a file under `benchmarks/results/` (written by a benchmark or a run);
* `runs.backlog.phases.0.turns_per_s` is the path to a value inside it (dict keys, list
  indices; a key with dots in it is quoted: `runs."End-to-end (x)".p99_ms`);
* `:.1f` is an optional format spec (Python's `format`), with an optional suffix after a
  `|`, e.g. `:.1f|x` renders `3.4x`; a value that is a string is written as it is.

`python -m benchmarks.figures render` rewrites every marked figure from its file;
`python -m benchmarks.figures check` (and `tests/test_figures.py` in `make test`) fails on a
figure that differs from its file, names a file or a path that does not exist, or on a
document that cites a results file without markers. So a figure can only change by a run that
writes its results file, and a figure typed by hand (or edited by one digit) fails the tests.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS = ("README.md", "BENCHMARKS.md", "RELIABILITY.md", "docs/CAPACITY.md", "docs/CONTRACTS.md")

FIGURE = re.compile(r"<!--fig (?P<file>[\w.\-/]+?):(?P<path>(?:\"[^\"]*\"|[^\s:\"<>])+)(?::(?P<fmt>[^|>\s]*)(?:\|(?P<suffix>[^>\s]*))?)?-->"
                    r"(?P<text>.*?)<!--/fig-->", re.S)


class FigureError(ValueError):
    """A marked figure whose source cannot be read (file, path or format)."""


@dataclass(frozen=True)
class Figure:
    doc: str
    line: int
    file: str
    path: str
    fmt: str
    suffix: str
    text: str

    def where(self) -> str:
        return f"{self.doc}:{self.line} ({self.file}:{self.path})"


def _split_path(path: str) -> list[str]:
    return [p.strip('"') for p in re.findall(r'"[^"]*"|[^.]+', path)]


def lookup(data: Any, path: str) -> Any:
    cur = data
    for part in _split_path(path):
        if isinstance(cur, list):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError) as exc:
                raise FigureError(f"no index {part!r} in a list of {len(cur)}") from exc
        elif isinstance(cur, dict):
            if part not in cur:
                raise FigureError(f"no key {part!r} (keys: {sorted(cur)[:12]})")
            cur = cur[part]
        else:
            raise FigureError(f"cannot descend into {type(cur).__name__} at {part!r}")
    return cur


def render_value(value: Any, fmt: str, suffix: str) -> str:
    if isinstance(value, str):
        return value + suffix
    try:
        return format(value, fmt) + suffix
    except (TypeError, ValueError) as exc:
        raise FigureError(f"cannot format {value!r} with {fmt!r}: {exc}") from exc


def marker(file: str, data: Any, path: str, fmt: str = "", suffix: str = "") -> str:
    """A marked figure for a document a script writes: the value at `path` of the results `data`
    (as read from `file`), rendered between the markers that name where it comes from."""
    spec = (f":{fmt}" + (f"|{suffix}" if suffix else "")) if (fmt or suffix) else ""
    return f"<!--fig {file}:{path}{spec}-->{render_value(lookup(data, path), fmt, suffix)}<!--/fig-->"


def figures(doc: str, text: str) -> list[Figure]:
    out = []
    for m in FIGURE.finditer(text):
        out.append(Figure(doc, text.count("\n", 0, m.start()) + 1, m["file"], m["path"], m["fmt"] or "",
                          m["suffix"] or "", m["text"]))
    return out


def _load(file: str, cache: dict[str, Any], results_dir: Path) -> Any:
    if file not in cache:
        p = results_dir / file
        if not p.is_file():
            raise FigureError(f"results file {p} does not exist")
        cache[file] = json.loads(p.read_text())
    return cache[file]


def expected(fig: Figure, cache: dict[str, Any], results_dir: Path = RESULTS_DIR) -> str:
    return render_value(lookup(_load(fig.file, cache, results_dir), fig.path), fig.fmt, fig.suffix)


def check(docs: tuple[str, ...] = DOCS, repo: Path = REPO, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Every problem found, one line each (empty: every figure equals its source)."""
    problems: list[str] = []
    cache: dict[str, Any] = {}
    for doc in docs:
        p = repo / doc
        if not p.is_file():
            continue
        for fig in figures(doc, p.read_text()):
            try:
                want = expected(fig, cache, results_dir)
            except FigureError as exc:
                problems.append(f"{fig.where()}: {exc}")
                continue
            if fig.text != want:
                problems.append(f"{fig.where()}: the document says {fig.text!r}, the results file {want!r}")
    return problems


def render(docs: tuple[str, ...] = DOCS, repo: Path = REPO, results_dir: Path = RESULTS_DIR) -> int:
    """Rewrite every marked figure from its results file; returns how many changed."""
    cache: dict[str, Any] = {}
    changed = 0
    for doc in docs:
        p = repo / doc
        if not p.is_file():
            continue
        text = p.read_text()

        def sub(m: re.Match[str]) -> str:
            nonlocal changed
            fig = Figure(doc, 0, m["file"], m["path"], m["fmt"] or "", m["suffix"] or "", m["text"])
            want = expected(fig, cache, results_dir)
            changed += want != fig.text
            return m.group(0)[: m.start("text") - m.start()] + want + "<!--/fig-->"

        new = FIGURE.sub(sub, text)
        if new != text:
            p.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["render"], ["check"]):
        print("usage: python -m benchmarks.figures render|check", file=sys.stderr)
        return 2
    if args == ["render"]:
        print(f"{render()} figure(s) changed")
        return 0
    problems = check()
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
