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


def _cli_commands() -> dict[str, object]:
    """{name: click command} of the `evostream` entry point, groups' subcommands as "group sub"."""
    import typer

    from stream import cli

    root = typer.main.get_command(cli.app)
    out: dict[str, object] = {}
    for name, cmd in root.commands.items():
        out[name] = cmd
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            out[f"{name} {sub}"] = subcmd
    return out


def test_cli_subcommands_in_readme_exist() -> None:
    commands = _cli_commands()
    shown = set(re.findall(r"^(?:\$ )?(?:\.venv/bin/)?evostream ([a-z-]+)", README, re.M))
    assert shown, "the README shows no evostream command"
    for sub in shown:
        assert sub in commands, f"README shows `evostream {sub}` but the CLI has no such command"


def test_every_cli_command_and_option_has_help() -> None:
    for name, cmd in _cli_commands().items():
        assert (cmd.help or cmd.short_help or "").strip(), f"`evostream {name}` has no help text"
        for param in cmd.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"`evostream {name}` option {param.opts} has no help text"


def test_compatibility_table_names_tests_that_exist() -> None:
    """Every test the README's TEI/OpenAI compatibility table cites exists (issue #18: the
    table's claims are each checked by the test named)."""
    import ast

    table = README.split("**Compatibility with TEI and OpenAI clients**", 1)[1].split("\n\n", 2)[1]
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(cited) >= 12, table
    for path, name in cited:
        tree = ast.parse((REPO / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"README cites {path}::{name}, which does not exist"
