"""Real worker processes for end-to-end and fault-injection tests.

Each `WorkerProc` is an `evostream worker` subprocess (faust + aiokafka + the tiny model) with
its own web port, pointed at the session's broker and Redis and at per-test topics, group and
Redis namespace. Tests kill -9, stop/continue and restart these processes; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PipelineEnv:
    """Topics, group and namespace of one test's pipeline (isolated from other tests)."""

    kafka_bootstrap: str
    redis_url: str
    turns_topic: str
    embeddings_topic: str
    dead_letter_topic: str
    partitions: int
    group_id: str = field(default_factory=lambda: f"test-group-{uuid.uuid4().hex[:8]}")
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    checkpoint: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("EVOSTREAM_") or k == "EVOSTREAM_CACHE_DIR"}
        e.update(
            EVOSTREAM_KAFKA_BOOTSTRAP=self.kafka_bootstrap,
            EVOSTREAM_REDIS_URL=self.redis_url,
            EVOSTREAM_TURNS_TOPIC=self.turns_topic,
            EVOSTREAM_EMBEDDINGS_TOPIC=self.embeddings_topic,
            EVOSTREAM_DEAD_LETTER_TOPIC=self.dead_letter_topic,
            EVOSTREAM_TURNS_PARTITIONS=str(self.partitions),
            EVOSTREAM_GROUP_ID=self.group_id,
            EVOSTREAM_REDIS_NAMESPACE=self.namespace,
            EVOSTREAM_MODEL=self.checkpoint,  # the model directory ("" = the seeded tiny one)
            EVOSTREAM_SESSION_TIMEOUT_S="6",
            EVOSTREAM_REBALANCE_TIMEOUT_S="6",
            EVOSTREAM_HEARTBEAT_INTERVAL_S="1",
            EVOSTREAM_COMMIT_INTERVAL_S="0.5",
            EVOSTREAM_LOG_JSON="false",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            # Query API authentication off, explicitly (issue #9): these are local test workers;
            # tests of the API itself turn it on through `extra`.
            EVOSTREAM_API_AUTH="off",
        )
        e.update(self.extra)
        return e


class WorkerProc:
    def __init__(self, penv: PipelineEnv, log_dir: Path, name: str = "w"):
        self.penv = penv
        self.port = free_port()
        self.name = name
        self.log_path = log_dir / f"worker-{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "WorkerProc":
        env = self.penv.env()
        env["EVOSTREAM_WEB_PORT"] = str(self.port)
        env["EVOSTREAM_WORKER_ID"] = f"{self.name}-{self.starts}"
        self.starts += 1
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            # faults are armed by the harness's own entry point, never by the production one
            entry = "devtools.faults" if any(k.startswith("EVOSTREAM_FAULT_") for k in env) else "stream.cli"
            self.proc = subprocess.Popen([sys.executable, "-m", entry, "worker"], cwd=REPO, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker {self.name} exited (rc={self.proc.returncode}); log:\n{self.tail()}")
            try:
                # serving (/readyz 200) and consuming its partitions (the ingestion signal,
                # issue #18: readiness alone no longer says the worker owns partitions)
                code, body = self.get("/readyz")
                if code == 200 and body.get("ready") and body.get("ingestion", {}).get("healthy", True):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker {self.name} not ready after {timeout}s; log:\n{self.tail()}")

    def status(self, timeout: float = 2.0) -> tuple[int, dict]:
        """`/readyz` as (status, state): the state is the body of a 200 and the `detail` of a
        503 (an error body, issue #21), so callers read the same keys either way."""
        code, body = self.get("/readyz", timeout=timeout)
        return code, body.get("detail", body) if code != 200 else body

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the crash the design must survive)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


async def read_topic(bootstrap: str, topic: str, *, idle_ms: int = 1500) -> list:
    """Every record currently in `topic` (all partitions, from the beginning), no group."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        parts = c.partitions_for_topic(topic) or set()
        if not parts:  # metadata from before the topic existed: refresh (public API) once
            await c.topics()
            parts = c.partitions_for_topic(topic) or set()
        if not parts:  # an empty list here would make "nothing was emitted" checks pass vacuously
            raise LookupError(f"topic {topic!r} not found on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        out = []
        while True:
            batch = await c.getmany(timeout_ms=idle_ms)
            if not batch:
                return out
            for msgs in batch.values():
                out.extend(msgs)
    finally:
        await c.stop()


def read_topic_sync(bootstrap: str, topic: str, idle_ms: int = 1500) -> list:
    return asyncio.run(read_topic(bootstrap, topic, idle_ms=idle_ms))


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")
