"""The `evostream` typer application object and the state every command shares.

Why global options are pulled out of argv before typer sees them: `--config FILE` and
`--debug` must work anywhere on the line (`evostream worker --config prod.toml`), while click
only accepts a group's options before the subcommand. `main()` (stream/cli/__init__.py)
removes them wherever they are; the callback below declares them too, so that `--help`
documents them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Optional

import typer

from stream.cli.errors import EXIT_CODE_HELP


@dataclass
class CliState:
    debug: bool = False
    settings: Any = None                 # the Settings the running command loaded (for error context)
    warnings: list[str] = field(default_factory=list)


STATE = CliState()


def version() -> str:
    try:
        return metadata.version("evostream")
    except metadata.PackageNotFoundError:  # running from a checkout without an install
        return "unknown (not installed)"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"evostream {version()}")
        raise typer.Exit(0)


HELP = """Streaming serving for EvoEmbedding: Kafka turns -> batched model workers -> Redis
checkpoints -> embeddings topic.

Settings come from EVOSTREAM_* variables and an optional settings file (--config FILE or
EVOSTREAM_CONFIG; JSON, TOML or YAML); flags win over both. `evostream settings --help` lists
every setting.
"""

EPILOG = "Exit codes:\n\n" + EXIT_CODE_HELP.replace("\n", "\n\n")

app = typer.Typer(name="evostream", help=HELP, epilog=EPILOG, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _root(
    config: Optional[str] = typer.Option(None, "--config", metavar="FILE",
                                         help="settings file (JSON/TOML/YAML); same as EVOSTREAM_CONFIG; "
                                              "accepted anywhere on the command line"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks (accepted anywhere on the command line)"),
    show_version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                      help="print the version and exit"),
) -> None:
    """Streaming serving for EvoEmbedding."""


def note(message: str) -> None:
    """A progress line for a person waiting (stderr, so stdout stays machine-readable)."""
    print(f"[evostream] {message}", file=sys.stderr, flush=True)
