"""The `evostream` typer application object and the state every command shares.

Global options (`--config FILE`, `--debug`) are parsed by typer/click, never by hand (issue
#21): the root callback declares them, and `build_command` gives every subcommand the same two
options, because users write them after the subcommand too (`evostream worker --config
prod.toml`) and click accepts a group's options only before it. Either place sets the same
state: the settings file goes to `stream.settings.CONFIG_FILE` (this process only; the
environment is not written), `--debug` turns on tracebacks and library logs.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Optional

import typer

from stream.cli.errors import EXIT_CODE_HELP


@dataclass
class CliState:
    debug: bool = False
    config: str | None = None            # --config FILE
    settings: Any = None                 # the Settings the running command loaded (for error context)
    warnings: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """A fresh state for one `main()` call (tests call it several times in one process)."""
        self.debug, self.config, self.settings = False, None, None
        self.warnings.clear()


STATE = CliState()

CONFIG_HELP = "settings file (JSON/TOML/YAML); same as EVOSTREAM_CONFIG, which it overrides"
DEBUG_HELP = "show tracebacks and library log lines"


def set_config(value: str | None) -> None:
    if value is not None:
        from stream.settings import CONFIG_FILE

        STATE.config = value
        CONFIG_FILE.set(value)


def set_debug(value: bool) -> None:
    if value:
        STATE.debug = True
        logging.getLogger().setLevel(logging.DEBUG)


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

# rich_markup_mode=None: click's plain help. typer's rich help shows a flag as `--debug <bool>`,
# which reads as "takes a value" (issue #18: `--debug true` was then refused).
app = typer.Typer(name="evostream", help=HELP, epilog=EPILOG, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _root(
    config: Optional[str] = typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP + " (also after "
                                         "the command)"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP + " (also after the command)"),
    show_version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                      help="print the version and exit"),
) -> None:
    """Streaming serving for EvoEmbedding."""
    set_config(config)
    set_debug(debug)


def _global_options() -> list[Any]:
    """`--config` and `--debug` for a subcommand, built by typer from a declaration (processed
    first, not passed to the command function)."""
    options = typer.Typer(add_completion=False)

    @options.command()
    def _declared(
        config: Optional[str] = typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP, expose_value=False,
                                             is_eager=True, callback=set_config),
        debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP, expose_value=False, is_eager=True,
                                   callback=set_debug),
    ) -> None:
        """Only a carrier of the two option declarations."""

    return list(typer.main.get_command(options).params)


def _add_global_options(command: Any) -> None:
    for sub in getattr(command, "commands", {}).values():
        names = {opt for p in sub.params for opt in getattr(p, "opts", [])}
        if "--config" not in names:
            sub.params.extend(_global_options())
        _add_global_options(sub)


def build_command() -> Any:  # a (typer-vendored) click command
    """The click command of the whole CLI: typer's, with the global options on every
    subcommand (groups included)."""
    root = typer.main.get_command(app)
    _add_global_options(root)
    return root


def note(message: str) -> None:
    """A progress line for a person waiting (stderr, so stdout stays machine-readable)."""
    print(f"[evostream] {message}", file=sys.stderr, flush=True)
