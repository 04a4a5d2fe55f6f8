"""Keep BENCHMARKS.md as sections that each benchmark rewrites from its own run."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery number below was printed by the command quoted in its section; re-run it to refresh.\n"


def update_section(path: Path, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")
