"""A Redis of the test's own for faults of the store itself (issue #17): emptied (FLUSHALL, a
replica promoted empty), restarted from an old snapshot, full (`noeviction` at maxmemory).

Why a server of its own: these faults hit every key of a server, and the session's Redis is
shared by tests running in parallel. The server is a real valkey/redis process on a free
loopback port (devtools.localstack.find_redis_server), stopped by the context manager.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from devtools.localstack import find_redis_server, free_ports
from tests.support.redis_servers import RedisProc


class OwnRedis:
    """One server with RDB snapshots on demand (`snapshot()` / `restart_from(snapshot)`) and an
    optional memory limit (`maxmemory`, noeviction: full means refused writes)."""

    def __init__(self, run_dir: Path, *, maxmemory: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        args = ["--appendonly", "no", "--dbfilename", "dump.rdb", "--maxmemory-policy", "noeviction"]
        if maxmemory:
            args += ["--maxmemory", maxmemory]
        self.proc = RedisProc(self.run_dir, free_ports(1)[0], name="own-redis",
                              binary=find_redis_server(self.run_dir), args=args)
        self.data = self.run_dir / "own-redis-data"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.proc.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> "OwnRedis":
        self.proc.start()
        return self

    def stop(self) -> None:
        self.proc.stop(grace=5.0)

    def flushall(self) -> None:
        with contextlib.closing(self.client()) as c:
            c.flushall()

    def snapshot(self, name: str) -> Path:
        """SAVE now and keep a copy of the RDB file (what a backup would hold)."""
        with contextlib.closing(self.client()) as c:
            c.save()
        keep = self.run_dir / f"{name}.rdb"
        shutil.copyfile(self.data / "dump.rdb", keep)
        return keep

    def restart_from(self, snapshot: Path) -> None:
        """Stop without saving and start again on `snapshot` (an old backup restored)."""
        with contextlib.closing(self.client()) as c, contextlib.suppress(redis.ConnectionError):
            c.shutdown(nosave=True)
        deadline = time.monotonic() + 20
        while self.proc.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc.stop(grace=2.0)
        shutil.copyfile(snapshot, self.data / "dump.rdb")
        self.proc.start()

    def fill(self, prefix: str = "junk", mb: int = 4) -> int:
        """Make the server full: write `mb` MiB of junk, then lower `maxmemory` below what is
        used (what a growing dataset does to a fixed limit), so that with `noeviction` every
        write is refused with OOM while reads still work. Returns the new limit."""
        with contextlib.closing(self.client()) as c:
            self._limit = c.config_get("maxmemory")["maxmemory"]
            for i in range(mb * 16):
                c.set(f"{prefix}:{i}", b"x" * 65536)
            limit = int(c.info("memory")["used_memory"]) - 512 * 1024
            c.config_set("maxmemory", limit)
        return limit

    def unfill(self, prefix: str = "junk") -> None:
        """Make room again: drop the junk and restore the limit."""
        with contextlib.closing(self.client()) as c:
            for k in c.scan_iter(f"{prefix}:*", count=1000):
                c.delete(k)
            c.config_set("maxmemory", getattr(self, "_limit", "0"))

    def commands_processed(self) -> int:
        with contextlib.closing(self.client()) as c:
            return int(c.info("stats")["total_commands_processed"])


@contextlib.contextmanager
def own_redis(run_dir: Path, **kw: object) -> Iterator[OwnRedis]:
    r = OwnRedis(run_dir, **kw).start()  # type: ignore[arg-type]
    try:
        yield r
    finally:
        r.stop()
