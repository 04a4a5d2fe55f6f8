"""`evostream` command line (typer). `main()` is the entry point (`stream.cli:main` and the
`evostream` script).

Every expected failure ends as `error: <one line>` on stderr and a documented exit code
(stream/cli/errors.py); a traceback is printed only with `--debug`. Global options are parsed
by typer/click (stream/cli/base.py), anywhere on the line.

May import: every room of stream (the CLI composes them), and devtools lazily, inside the
`stack` and `demo` commands only (the dev tools are not installed with the package).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import typer

from stream.cli import core as _core  # noqa: F401 - registers the commands
from stream.cli import cold_tier as _cold_tier  # noqa: F401 - registers the group
from stream.cli import dead_letters as _dead_letters  # noqa: F401 - registers the group
from stream.cli import rebuild as _rebuild  # noqa: F401 - registers `rebuild` and the `store` group (issue #17)
from stream.cli import sink as _sink  # noqa: F401 - registers `sink` and `search` (issue #19)
from stream.cli.base import STATE, app, build_command
from stream.cli.errors import ExitCode, explain


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.reset()
    from stream.settings import CONFIG_FILE

    CONFIG_FILE.set(None)
    # Operator commands print their own lines; library log records (a reconnect, a reloaded
    # script) only with --debug (its option callback lowers the level). `worker` installs its
    # own logging from the settings.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    root_level = logging.getLogger().level
    command = build_command()
    try:
        return _run(command, args)
    finally:
        logging.getLogger().setLevel(root_level)  # `--debug` lowered it for this call only


def _run(command: Any, args: list[str]) -> int:
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


__all__ = ["app", "main"]
