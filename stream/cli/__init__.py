"""`evostream` command line (typer). `main()` is the entry point (`stream.cli:main` and the
`evostream` script).

Every expected failure ends as `error: <one line>` on stderr and a documented exit code
(stream/cli/errors.py); a traceback is printed only with `--debug`.

May import: every room of stream (the CLI composes them), and devtools lazily, inside the
`stack` and `demo` commands only (the dev tools are not installed with the package).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import typer

from stream.cli import core as _core  # noqa: F401 - registers the commands
from stream.cli import cold_tier as _cold_tier  # noqa: F401 - registers the group
from stream.cli import dead_letters as _dead_letters  # noqa: F401 - registers the group
from stream.cli import rebuild as _rebuild  # noqa: F401 - registers `rebuild` and the `store` group (issue #17)
from stream.cli import sink as _sink  # noqa: F401 - registers `sink` and `search` (issue #19)
from stream.cli.base import STATE, app
from stream.cli.errors import CliError, ExitCode, explain


def split_global_options(argv: list[str]) -> tuple[list[str], str | None, bool]:
    """Remove `--config FILE` / `--config=FILE` and `--debug` wherever they are (they are
    global options, valid after the subcommand too). Everything after `--` is left alone."""
    out: list[str] = []
    config: str | None = None
    debug = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a == "--debug":
            debug = True
        elif a == "--config":
            if i + 1 >= len(argv):
                raise CliError("--config needs a FILE", ExitCode.USAGE)
            config = argv[i + 1]
            i += 1
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, config, debug


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args, config, debug = split_global_options(args)
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return int(exc.code)
    STATE.debug = debug or STATE.debug
    # Operator commands print their own lines; library log records (a reconnect, a reloaded
    # script) only with --debug. `worker` installs its own logging from the settings.
    logging.basicConfig(level=logging.DEBUG if STATE.debug else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if config:
        os.environ["EVOSTREAM_CONFIG"] = config
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="evostream", standalone_mode=False)
        return int(rv) if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except typer.TyperException as exc:  # usage errors (typer's click): its own message and hint
        exc.show()
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:  # `evostream inspect c1 | head`: the reader left; say nothing more
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that the exit flush does not fail again
        except OSError:
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
    except SystemExit as exc:  # a library calling sys.exit (faust's worker does)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - the one place where failures become a line + code
        s = STATE.settings
        err = explain(exc, kafka=getattr(s, "kafka_bootstrap", None), redis_url=getattr(s, "redis_url", None))
        if STATE.debug:
            traceback.print_exception(exc)
        print(f"error: {err.message}", file=sys.stderr)
        return int(err.code)


__all__ = ["app", "main", "split_global_options"]
