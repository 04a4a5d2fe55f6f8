"""`evostream` entry point (the `evostream` script and `python -m stream.cli`).

The command line itself lives in stream/commands/ (typer): one module per group of commands,
expected failures as one line + a documented exit code (`evostream --help` lists them).
"""

from __future__ import annotations

from stream.commands import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
