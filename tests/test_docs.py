"""The README is a user's document: its configuration table and commands must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from stream.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_setting_is_documented_and_nothing_else() -> None:
    documented = set(re.findall(r"^\| `EVOSTREAM_([A-Z0-9_]+)` \|", README, re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert documented == fields, (
        f"undocumented settings: {sorted(fields - documented)}; documented but unknown: {sorted(documented - fields)}")


def test_readme_commands_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test", "bench", "chaos-long", "stack-start", "stack-stop"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target} is in the README but not the Makefile"
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_cli_subcommands_in_readme_exist() -> None:
    from stream import cli

    src = Path(cli.__file__).read_text()
    for sub in set(re.findall(r"^evostream ([a-z-]+)", README, re.M)):
        assert f'add_parser("{sub}"' in src, f"README shows `evostream {sub}` but the CLI has no such command"
