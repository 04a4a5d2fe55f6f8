"""Keep BENCHMARKS.md as sections that each benchmark rewrites from its own run.

Every number a section prints is also saved, in order, to a results file of its own
(`benchmarks/results/section_<title>.json`), and written into the section as a figure marker
into that file (benchmarks/figures.py): so a figure in BENCHMARKS.md (or quoted in README.md)
can only change by a run that writes its file, and one edited by hand fails
tests/test_figures.py. Numbers inside code (commands, flags), link targets and comments are
left as they are: they are inputs, not measurements.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery number below was printed by the command quoted in its section; re-run it to refresh.\n"
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# Spans whose numbers are not figures: fenced code, inline code, comments (and existing figure
# markers), link targets.
_SKIP = re.compile(r"<!--fig .*?<!--/fig-->|```.*?```|`[^`\n]*`|<!--.*?-->|\]\([^)\n]*\)", re.S)
# A number as the benchmarks print it: 12, 1,234, 3.14, 4.8e-05, followed by a unit letter x or
# a separator, never glued to a word (x86_64, glibc2.36, qwen3, r=8 are left alone).
_NUMBER = re.compile(r"(?<![\w.\-/#=])\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?=x(?!\w)|%|[^\w.,]|[.,](?!\d)|$)")


def section_file(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:60]
    return f"section_{slug}.json"


def mark_figures(body: str, file: str) -> tuple[str, list[str]]:
    """(body with every printed number as a figure marker into `file`, the numbers in order)."""
    values: list[str] = []
    out: list[str] = []
    pos = 0

    def numbers(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            token = m.group(0).rstrip(",")
            rest = m.group(0)[len(token):]
            values.append(token)
            return f"<!--fig {file}:figures.{len(values) - 1}-->{token}<!--/fig-->{rest}"

        return _NUMBER.sub(sub, text)

    for m in _SKIP.finditer(body):
        out.append(numbers(body[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(numbers(body[pos:]))
    return "".join(out), values


def update_section(path: Path, title: str, body: str, *, results_dir: Path | None = None) -> None:
    """Replace (or append) the section `title` of `path` with `body`, its numbers as figure
    markers into the section's results file (written next to the others)."""
    if results_dir is None:
        results_dir = RESULTS_DIR if path.resolve().parent == REPO else path.parent / "results"
    file = section_file(title)
    marked, values = mark_figures(body.strip(), file)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / file).write_text(json.dumps({
        "section": title, "document": path.name,
        "written_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "about": "every number the section printed, in order (benchmarks/report.py)",
        "figures": values}, indent=1) + "\n")
    text = path.read_text() if path.exists() else HEADER
    block = f"## {title}\n\n{marked}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")
