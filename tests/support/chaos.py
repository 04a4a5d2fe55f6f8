"""Harness of the fault-injection suite (tests/test_chaos.py): scale, a streaming producer, a
fleet of real worker processes that are killed / frozen / restarted, Redis probes, and the
one-line JSON summary every scenario appends to the reliability report.

Expected outputs and the output checker come from `tests/support/oracle.py`, the traffic from
`tests/support/traffic.py`; this module only adds what chaos needs on top:

* `Scale`: scenario sizes, `EVOSTREAM_CHAOS_SCALE=short|long` (short is the CI default);
* `StreamingProducer`: publishes records at a steady rate from a background thread, so faults
  land *while* traffic flows, and remembers the highest seq acknowledged per conversation;
* `Fleet`: named `WorkerProc`s; `poll()` notices workers that died (telling a planned fault,
  see devtools/faults.py, from an unexpected exit) and restarts them when asked to;
* `RedisProbe`: applied seq per conversation, keys of a namespace (survives Redis outages);
* `Summary` / `append_report`: `EVOSTREAM_CHAOS_REPORT` (default .run/chaos-report.jsonl),
  rendered into RELIABILITY.md by scripts/chaos_report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from aiokafka import AIOKafkaProducer

from stream.state.keys import conversation_keys

from .oracle import metrics
from .workers import REPO, PipelineEnv, WorkerProc

SCALE_ENV = "EVOSTREAM_CHAOS_SCALE"
REPORT_ENV = "EVOSTREAM_CHAOS_REPORT"
DEFAULT_REPORT = REPO / ".run" / "chaos-report.jsonl"
RUN_ID_ENV = "EVOSTREAM_CHAOS_RUN_ID"
COMMAND_ENV = "EVOSTREAM_CHAOS_COMMAND"
RUN_ID = os.environ.get(RUN_ID_ENV) or (f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}")
"""Groups the summary lines of one pytest session (the report renders one run). tests/conftest.py
sets it once per session, so that pytest-xdist workers (other processes) share it."""

Record = tuple[bytes | None, bytes | None]


# --------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class Scale:
    """Sizes of every scenario. `short` keeps the whole suite near 5 minutes on 2 shared
    cores (a few kills, one rebalance round, one outage, a few hundred hostile records);
    `long` is the soak behind RELIABILITY.md."""

    name: str
    seed: int
    # 1. kill -9
    kill_conversations: int
    kill_turns: int
    kill_rate: float            # records/s
    kill_workers: int
    kill_fault_rounds: int      # each round: one kill at every fault point
    kill_external: int          # SIGKILLs from outside at random moments
    # 2. rebalance + zombie
    rebalance_conversations: int
    rebalance_turns: int
    rebalance_rate: float
    rebalance_rounds: int       # each round: 1 -> 3 workers (one freezes as a zombie) -> 2
    rebalance_external_pauses: int
    # 3. Redis outage
    outage_conversations: int
    outage_turns: int
    outage_rate: float
    outage_kinds: tuple[str, ...]   # "stop" (SIGTERM, restart with data), "kill", "pause"
    outage_seconds: float
    # 4. hostile input
    hostile_records: int
    hostile_conversations: int
    hostile_turns: int
    hostile_rate: float
    hostile_max_record_bytes: int
    # 5. memory bounds
    memory_idle_conversations: int
    memory_idle_turns: int
    memory_active_conversations: int
    memory_active_turns: int
    memory_rate: float
    memory_cache_bytes: int
    memory_ttl_s: int
    # 6. broker faults (issue #12): a dedicated broker behind a proxy (tests/support/kafka_proxy.py)
    # 7. production faults (issue #7): evicted keys, deletes vs a zombie, two tenants, one id
    prod_conversations: int = 8            # per tenant (same ids in both tenants)
    prod_turns: int = 8
    prod_rate: float = 12.0
    prod_victims: int = 3                  # conversations that lose one checkpoint key mid-stream
    prod_deletes: int = 3                  # conversations deleted while a zombie holds a batch
    broker_conversations: int = 16
    broker_turns: int = 10
    broker_rate: float = 5.0
    broker_pauses: int = 1                 # SIGSTOP the broker past the session timeout, SIGCONT
    broker_pause_extra_s: float = 6.0      # pause = session timeout + this
    broker_partitions: tuple[str, ...] = ("blackhole",)  # one worker cut off from Kafka, per round
    broker_partition_extra_s: float = 8.0  # partition = session timeout + this (others take over)

    @property
    def timeout(self) -> float:
        """Generous bound for any one wait (2 shared cores, other test runs beside us)."""
        return 240.0 if self.name == "short" else 600.0


SCALES = {
    "short": Scale(
        name="short", seed=7,
        kill_conversations=24, kill_turns=12, kill_rate=4.0, kill_workers=2, kill_fault_rounds=1, kill_external=1,
        rebalance_conversations=16, rebalance_turns=10, rebalance_rate=5.0, rebalance_rounds=1,
        rebalance_external_pauses=0,
        outage_conversations=12, outage_turns=8, outage_rate=8.0, outage_kinds=("stop",), outage_seconds=8.0,
        hostile_records=300, hostile_conversations=10, hostile_turns=6, hostile_rate=60.0,
        hostile_max_record_bytes=64 * 1024,
        memory_idle_conversations=240, memory_idle_turns=2, memory_active_conversations=8, memory_active_turns=12,
        memory_rate=5.0, memory_cache_bytes=192 * 1024, memory_ttl_s=12,
    ),
    "long": Scale(
        name="long", seed=11,
        kill_conversations=60, kill_turns=16, kill_rate=5.0, kill_workers=2, kill_fault_rounds=3, kill_external=6,
        rebalance_conversations=60, rebalance_turns=16, rebalance_rate=5.0, rebalance_rounds=4,
        rebalance_external_pauses=3,
        outage_conversations=40, outage_turns=16, outage_rate=5.0, outage_kinds=("stop", "kill", "pause", "stop"),
        outage_seconds=15.0,
        hostile_records=2500, hostile_conversations=30, hostile_turns=10, hostile_rate=80.0,
        hostile_max_record_bytes=1_000_000,
        memory_idle_conversations=1200, memory_idle_turns=2, memory_active_conversations=12,
        memory_active_turns=24, memory_rate=8.0, memory_cache_bytes=512 * 1024, memory_ttl_s=20,
        broker_conversations=40, broker_turns=16, broker_rate=5.0, broker_pauses=3, broker_pause_extra_s=10.0,
        broker_partitions=("blackhole", "cut", "blackhole"), broker_partition_extra_s=12.0,
        prod_conversations=24, prod_turns=14, prod_rate=12.0, prod_victims=6, prod_deletes=6,
    ),
}


def current_scale() -> Scale:
    name = os.environ.get(SCALE_ENV, "short").strip().lower() or "short"
    if name not in SCALES:
        raise ValueError(f"{SCALE_ENV}={name!r}: expected one of {sorted(SCALES)}")
    return SCALES[name]


# --------------------------------------------------------------------------- waiting


class ScenarioFailed(AssertionError):
    pass


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.5,
               tick: Callable[[], None] | None = None) -> object:
    """Poll `predicate` (calling `tick` first each round: fleet supervision) until truthy."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if tick is not None:
            tick()
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s (last: {str(last)[:300]})")
        time.sleep(interval)


def sleep_ticking(seconds: float, tick: Callable[[], None] | None, interval: float = 0.25) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if tick is not None:
            tick()
        time.sleep(min(interval, max(0.0, end - time.monotonic())))


# --------------------------------------------------------------------------- producer


@dataclass
class Sent:
    count: int = 0
    last_seq: dict[str, int] = field(default_factory=dict)


class StreamingProducer:
    """Publish `records` to `topic` at `rate` records/s from a background thread (own event
    loop, one producer: per-partition order is the given order). `tags[i]` is (cid, seq) for a
    turn whose progress should be tracked, else None."""

    def __init__(self, bootstrap: str, topic: str, records: Sequence[Record],
                 tags: Sequence[tuple[str, int] | None] | None = None, *, rate: float, chunk: int = 8):
        self.bootstrap = bootstrap
        self.topic = topic
        self.records = list(records)
        self.tags = list(tags) if tags is not None else [None] * len(self.records)
        if len(self.tags) != len(self.records):
            raise ValueError("one tag per record")
        self.rate = rate
        self.chunk = max(1, chunk)
        self._lock = threading.Lock()
        self._sent = Sent()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)
        self._hold = threading.Event()
        self._hold.set()  # set = may send
        self.started_at = 0.0
        self.finished_at = 0.0

    # -- control ----------------------------------------------------------------------------
    def start(self) -> StreamingProducer:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def hold(self) -> None:
        self._hold.clear()

    def release(self) -> None:
        self._hold.set()

    def set_rate(self, rate: float) -> None:
        """Change the pace from the next chunk on (e.g. flush the rest once the faults are done)."""
        self.rate = rate

    @property
    def done(self) -> bool:
        return not self._thread.is_alive() and self._thread.ident is not None

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"producer still sending after {timeout}s ({self.sent.count}/{len(self.records)})")
        if self.error is not None:
            raise ScenarioFailed(f"producer failed: {self.error!r}") from self.error

    @property
    def sent(self) -> Sent:
        with self._lock:
            return Sent(self._sent.count, dict(self._sent.last_seq))

    def fraction(self) -> float:
        return self.sent.count / max(1, len(self.records))

    # -- thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    async def _produce(self) -> None:
        prod = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2,
                                max_request_size=8 * 1024 * 1024, request_timeout_ms=60_000)
        await prod.start()
        try:
            due = time.monotonic()
            for start in range(0, len(self.records), self.chunk):
                while not self._hold.is_set():
                    await asyncio.sleep(0.05)
                    due = time.monotonic()
                batch = range(start, min(start + self.chunk, len(self.records)))
                futures = [await prod.send(self.topic, self.records[i][1], key=self.records[i][0]) for i in batch]
                for f in futures:
                    await f
                with self._lock:
                    self._sent.count += len(batch)
                    for i in batch:
                        tag = self.tags[i]
                        if tag is not None:
                            cid, seq = tag
                            self._sent.last_seq[cid] = max(seq, self._sent.last_seq.get(cid, -1))
                due = max(due + len(batch) / self.rate, time.monotonic() - 1.0)
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            await prod.stop()


# --------------------------------------------------------------------------- workers

FAULT_LINE = re.compile(rb"EVOSTREAM_FAULT (kill|stop) (\w+) pid=(\d+)")


def fault_env(point: str, *, action: str = "kill", skip: int = 0, prob: float = 1.0,
              seed: int | None = None) -> dict[str, str]:
    """Environment that arms devtools/faults.py in a worker (one fault per process)."""
    env = {"EVOSTREAM_FAULT_POINT": point, "EVOSTREAM_FAULT_ACTION": action,
           "EVOSTREAM_FAULT_SKIP": str(skip), "EVOSTREAM_FAULT_PROB": str(prob), "EVOSTREAM_FAULT_MAX": "1"}
    if seed is not None:
        env["EVOSTREAM_FAULT_SEED"] = str(seed)
    return env


def proc_state(pid: int) -> str | None:
    """State letter from /proc/PID/stat ('T' = stopped), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class FleetEvent:
    t: float
    what: str
    worker: str
    detail: str = ""


class Fleet:
    """Named worker processes of one scenario.

    A worker is *expected up* from `start` until `stop`/`kill`; `poll()` (call it often) finds
    expected-up workers that exited: an exit right after a `EVOSTREAM_FAULT kill` line is a
    planned fault (counted; restarted when `on_fault` says so), anything else is an unexpected
    exit and raises `ScenarioFailed` with the log -- a worker must never die on its own."""

    def __init__(self, penv: PipelineEnv, log_dir: Path, *, on_fault: Callable[[str, str], dict | None] | None = None):
        self.penv = penv
        self.log_dir = log_dir
        self.workers: dict[str, WorkerProc] = {}
        self.up: set[str] = set()
        self.events: list[FleetEvent] = []
        self.kills = 0                     # SIGKILLs by the harness
        self.fault_kills: Counter[str] = Counter()  # by fault point
        self.fault_stops: Counter[str] = Counter()
        self.restarts = 0
        self.membership_changes = 0
        self.on_fault = on_fault           # (worker, point) -> env for the restart, or None = leave down
        self._fault_lines: dict[str, int] = {}
        self._pending_kill: dict[str, str] = {}  # fault line seen, death not yet
        self._t0 = time.monotonic()

    def _event(self, what: str, name: str, detail: str = "") -> None:
        self.events.append(FleetEvent(round(time.monotonic() - self._t0, 2), what, name, detail))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, name: str, extra: dict[str, str] | None = None) -> WorkerProc:
        w = self.workers.get(name)
        penv = dataclasses.replace(self.penv, extra={**self.penv.extra, **(extra or {})})
        if w is None:
            w = WorkerProc(penv, self.log_dir, name)
            self.workers[name] = w
        else:
            if w.alive():
                raise RuntimeError(f"worker {name} is already running")
            w.penv = penv
        self._fault_lines[name] = self._count_fault_lines(w)
        self._pending_kill.pop(name, None)
        w.start()
        self.up.add(name)
        self.membership_changes += 1
        self._event("start", name, ",".join(f"{k}={v}" for k, v in (extra or {}).items()))
        return w

    def kill(self, name: str) -> None:
        """SIGKILL from outside (a crash at whatever moment this is)."""
        w = self.workers[name]
        self.up.discard(name)
        if w.alive():
            w.kill()
            self.kills += 1
            self.membership_changes += 1
            self._event("kill", name)

    def stop(self, name: str) -> None:
        """Graceful leave (SIGTERM)."""
        w = self.workers[name]
        self.up.discard(name)
        if w.alive():
            w.resume()  # a frozen worker cannot act on SIGTERM
            w.stop(timeout=30)
            self.membership_changes += 1
            self._event("stop", name)

    def restart(self, name: str, extra: dict[str, str] | None = None) -> WorkerProc:
        self.restarts += 1
        return self.start(name, extra)

    def pause(self, name: str) -> None:
        self.workers[name].pause()
        self._event("pause", name)

    def resume(self, name: str) -> None:
        self.workers[name].resume()
        self._event("resume", name)

    def frozen(self, name: str) -> bool:
        w = self.workers[name]
        return w.alive() and proc_state(w.proc.pid) == "T"

    def stop_all(self) -> None:
        """SIGTERM every worker at once (they shut down in parallel), SIGKILL stragglers."""
        t = time.monotonic()
        live = [w for w in self.workers.values() if w.alive()]
        self.up.clear()
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                w.resume()  # a frozen worker cannot act on SIGTERM
                os.killpg(w.proc.pid, signal.SIGTERM)
        for w in live:
            try:
                w.proc.wait(max(1.0, 20 - (time.monotonic() - t)))
            except subprocess.TimeoutExpired:
                w.kill()
        self.stop_seconds = round(time.monotonic() - t, 1)

    # -- supervision --------------------------------------------------------------------------
    def _count_fault_lines(self, w: WorkerProc) -> int:
        try:
            return len(FAULT_LINE.findall(w.log_path.read_bytes()))
        except OSError:
            return 0

    def _new_fault_lines(self, name: str) -> list[tuple[str, str]]:
        w = self.workers[name]
        try:
            found = FAULT_LINE.findall(w.log_path.read_bytes())
        except OSError:
            return []
        seen = self._fault_lines.get(name, 0)
        self._fault_lines[name] = len(found)
        return [(a.decode(), p.decode()) for a, p, _ in found[seen:]]

    def poll(self) -> None:
        for name in sorted(self.up):
            w = self.workers[name]
            alive = w.alive()  # first: a worker found dead has written all its lines
            for action, point in self._new_fault_lines(name):
                if action == "stop":
                    self.fault_stops[point] += 1
                    self._event("fault-stop", name, point)
                else:
                    self._pending_kill[name] = point
            if alive:
                continue
            point = self._pending_kill.pop(name, None)
            if point is not None and w.proc.returncode == -9:
                self.fault_kills[point] += 1
                self.up.discard(name)
                self.membership_changes += 1
                self._event("fault-kill", name, point)
                nxt = self.on_fault(name, point) if self.on_fault else None
                if nxt is not None:
                    self.restart(name, nxt)
                continue
            self.up.discard(name)
            raise ScenarioFailed(f"worker {name} exited on its own (rc={w.proc.returncode}); log:\n{w.tail(120)}")

    @property
    def total_kills(self) -> int:
        return self.kills + sum(self.fault_kills.values())

    def alive_workers(self) -> list[WorkerProc]:
        return [self.workers[n] for n in sorted(self.up) if self.workers[n].alive()]

    def metric_sum(self, name: str) -> float:
        total = 0.0
        for w in self.alive_workers():
            if self.frozen(w.name):
                continue
            try:
                total += metrics(w).get(name, 0.0)
            except OSError:
                pass
        return total

    def logs(self, n: int = 60) -> str:
        return "\n".join(f"----- worker {w.name} ({w.log_path}) -----\n{w.tail(n)}" for w in self.workers.values())

    def log_text(self) -> str:
        out = []
        for w in self.workers.values():
            try:
                out.append(w.log_path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)


# --------------------------------------------------------------------------- Redis


class RedisProbe:
    """Read-only view of one namespace; every call tolerates Redis being down (returns None)."""

    def __init__(self, url: str, namespace: str):
        self.client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        self.namespace = namespace

    def seqs(self, cids: Iterable[str]) -> dict[str, int] | None:
        cids = list(cids)
        try:
            pipe = self.client.pipeline(transaction=False)
            for cid in cids:
                pipe.hget(conversation_keys(self.namespace, cid).meta, "seq")
            raw = pipe.execute()
        except redis.RedisError:
            return None
        return {cid: (int(v) if v is not None else -1) for cid, v in zip(cids, raw)}

    def applied(self, last_seq: dict[str, int]) -> int | None:
        """Turns checkpointed, counting each conversation up to the seq given."""
        got = self.seqs(last_seq)
        if got is None:
            return None
        return sum(min(got[c], s) + 1 for c, s in last_seq.items())

    def caught_up(self, last_seq: dict[str, int]) -> bool:
        got = self.seqs(last_seq)
        return got is not None and all(got[c] >= s for c, s in last_seq.items())

    def keys(self, pattern_suffix: str = "*") -> list[bytes] | None:
        try:
            return list(self.client.scan_iter(match=f"{self.namespace}:{pattern_suffix}", count=1000))
        except redis.RedisError:
            return None

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu or 'unknown CPU'}){mem}, Python {platform.python_version()}"


@dataclass
class Summary:
    """One scenario's result line in the report (every number measured, none typed in)."""

    scenario: str
    scale: str
    run_id: str = RUN_ID
    ok: bool = False
    turns: int = 0                 # good turns streamed (each must be applied exactly once)
    conversations: int = 0
    records: int = 0               # records published (turns + hostile)
    kills: int = 0                 # SIGKILLs of workers (harness + fault points)
    kills_by_point: dict[str, int] = field(default_factory=dict)
    zombies: int = 0               # workers frozen past the session timeout, then resumed
    pauses: int = 0
    rebalances: int = 0            # group membership changes (joins, leaves, deaths)
    outages: int = 0
    outage_kinds: list[str] = field(default_factory=list)
    hostile: int = 0               # hostile records mixed in
    dead_letters: int = 0
    lost: int = 0                  # turns without an embedding event
    states_checked: int = 0
    states_differing: int = 0
    duplicates: int = 0            # extra copies of embedding events
    duplicated_keys: int = 0
    non_identical: int = 0         # (cid, seq) whose copies differ in any byte
    max_abs_diff: float = 0.0      # vs the offline replay
    conflicts: float = 0.0         # commits refused by the CAS (zombie writes fenced off)
    # --- the ledger (issue #20): what the report prints, counted by the harness from the
    # topics and Redis at the end of the scenario, never typed in or taken from the system --
    applied: int = 0               # turns whose embedding was delivered and equals the offline replay
    differing: int = 0             # turns delivered with an embedding that differs from the replay
    dead_lettered: dict[str, int] = field(default_factory=dict)  # dead letters on the topic, by reason
    expired: int = 0               # conversations whose state was seen to expire from Redis
    duplicates_byte_identical: int = 0   # extra copies equal to the first, byte for byte
    duplicates_byte_different: int = 0  # extra copies differing in any byte (must be 0)
    turns_in_checked_checkpoints: int = 0  # turns covered by the checkpoints compared equal
    # the system's own counters (Prometheus metrics of the workers), reported as such
    system_counters: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0
    started_at: str = ""
    machine: str = ""
    command: str = ""
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False, default=str)


def report_path() -> Path:
    p = os.environ.get(REPORT_ENV)
    return Path(p) if p else DEFAULT_REPORT


def command_line() -> str:
    if os.environ.get(COMMAND_ENV):  # set by tests/conftest.py in the pytest process that xdist workers inherit
        return os.environ[COMMAND_ENV]
    scale = os.environ.get(SCALE_ENV)
    argv = " ".join(sys.argv[1:]) if sys.argv else ""
    prefix = f"{SCALE_ENV}={scale} " if scale else ""
    return f"{prefix}python -m pytest {argv}".strip()


def append_report(summary: Summary) -> None:
    line = summary.line()
    print(f"\nCHAOS-SUMMARY {line}", flush=True)
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(line + "\n")


def new_summary(scenario: str, scale: Scale) -> Summary:
    return Summary(scenario=scenario, scale=scale.name,
                   started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                   machine=machine(), command=command_line())


def jitter(rng: random.Random, lo: float, hi: float) -> float:
    return rng.uniform(lo, hi)
