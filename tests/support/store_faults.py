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


# --------------------------------------------------------------------------- chaos helpers


def run_rebuild_cli(env: dict[str, str], into: str, *extra: str, timeout: float = 600) -> dict:
    """`evostream rebuild --into NS` as an operator runs it; its JSON report (stdout)."""
    import json
    import subprocess
    import sys

    from tests.support.workers import REPO

    out = subprocess.run([sys.executable, "-m", "stream.cli", "rebuild", "--into", into, *extra], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise AssertionError(f"evostream rebuild exited {out.returncode}:\n{out.stderr[-4000:]}")
    rep = json.loads(out.stdout)
    rep["stderr_lines"] = out.stderr.count("\n")
    rep["progress_lines"] = sum(1 for line in out.stderr.splitlines() if "ETA" in line)
    return rep


def retained_turns(bootstrap: str, topic: str, through: dict[str, int]) -> dict[str, list]:
    """Per conversation, in record order, the turns the topic holds through `through`
    (partition -> last offset, a rebuild report's): what an offline replay reads."""
    from collections import defaultdict

    from schemas.events import TurnEvent
    from tests.support.workers import read_topic_sync

    out: dict[str, list] = defaultdict(list)
    for m in sorted(read_topic_sync(bootstrap, topic), key=lambda m: (m.partition, m.offset)):
        if m.offset <= through.get(str(m.partition), -1):
            ev = TurnEvent.model_validate_json(m.value)
            out[ev.conversation_id].append(ev.to_turn_input())
    return dict(out)


def bit_for_bit(got: dict, want: dict) -> dict[str, str]:
    """Conversations whose stored state is not exactly the offline replay's (latents compared
    with torch.equal: no tolerance), with what differs."""
    import torch

    bad = {}
    for cid, w in want.items():
        g = got.get(cid)
        if g is None:
            bad[cid] = "no state"
        elif (g.seq, g.snapshot_len, g.segment_token_ids) != (w.seq, w.snapshot_len, w.segment_token_ids):
            bad[cid] = f"bookkeeping: seq {g.seq} vs {w.seq}"
        elif g.latents.shape != w.latents.shape or not torch.equal(g.latents, w.latents):
            bad[cid] = f"latents differ (max {float((g.latents - w.latents).abs().max()) if g.latents.shape == w.latents.shape else 'shape'})"
    return bad
