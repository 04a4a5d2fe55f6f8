"""A worker cut off from Kafka says so, keeps its log short, and shuts down on time.

Real processes only: a dedicated tansu broker behind a TCP proxy that the test controls
(tests/support/kafka_proxy.py; the session's broker is never touched), the session's Redis,
and a real `evostream worker` subprocess. The faults are what an operator sees in a broker
incident: connections refused (`cut`: broker down) and connections that stay open but never
answer (`blackhole`: a hung broker or a network dropping packets).

Reproduced on the code before issue #12: `/readyz` stayed 200 during the outage, the log grew
by about 20 lines a second, and SIGTERM with the broker away did not end the process.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from stream.kafka.topics import ensure_topics_sync
from tests.support.kafka_proxy import proxied_broker, wait
from tests.support.oracle import metrics
from tests.support.traffic import produce, turn_record
from tests.support.workers import PipelineEnv, WorkerProc, read_topic_sync

GRACE_S = 8.0
FAST = {
    "EVOSTREAM_BROKER_PROBE_INTERVAL_S": "1",
    "EVOSTREAM_BROKER_PROBE_TIMEOUT_S": "2",
    "EVOSTREAM_BROKER_UNREACHABLE_AFTER_S": "3",
    "EVOSTREAM_BROKER_RETRY_BACKOFF_MAX_S": "5",
    "EVOSTREAM_SHUTDOWN_GRACE_S": str(GRACE_S),
}
SIGTERM_BOUND_S = 3 * GRACE_S
"""A generous bound on SIGTERM-to-exit: the shutdown guard ends the process after GRACE_S; the
rest is slack for a loaded 2-core machine (interpreter teardown). Before issue #12 the process
did not exit at all; the time it really takes is printed, not asserted tightly."""
LOG_LINES_PER_MIN_MAX = 30
"""Bound on log lines per minute during an outage (measured over OUTAGE_WINDOW_S). Before the
fix: about 20 lines per SECOND. After: one transition line plus a few summarised library lines."""
OUTAGE_WINDOW_S = 20.0
RECONNECTS_PER_S_MAX = 3.0
"""Bound on the worker's connection attempts per second to a refusing broker, in the steady
state of an outage (capped exponential back-off; measured 0.6/s after, 18.7/s before)."""


@pytest.fixture
def proxied(tmp_path: Path):
    with proxied_broker(tmp_path / "broker") as bp:
        yield bp


def _env(proxy, redis_url: str, partitions: int = 2) -> PipelineEnv:
    names = {k: f"test.broker-faults.{k}.{time.monotonic_ns()}" for k in ("turns", "emb", "dl")}
    ensure_topics_sync(proxy.address, {names["turns"]: partitions, names["emb"]: partitions, names["dl"]: 1})
    return PipelineEnv(kafka_bootstrap=proxy.address, redis_url=redis_url, turns_topic=names["turns"],
                       embeddings_topic=names["emb"], dead_letter_topic=names["dl"], partitions=partitions,
                       extra=dict(FAST))


def _start(penv: PipelineEnv, proxy, tmp_path: Path, name: str) -> WorkerProc:
    w = WorkerProc(penv, tmp_path, name).start()
    proxy.watch(w.proc.pid)
    w.wait_ready(180)
    return w


def _lines(w: WorkerProc) -> list[str]:
    return w.log_path.read_text(errors="replace").splitlines()


def _readyz(w: WorkerProc) -> tuple[int, dict]:
    try:
        return w.get("/readyz", timeout=3)
    except OSError as exc:
        return 0, {"error": repr(exc)}


def _sigterm_and_time(w: WorkerProc, bound: float) -> tuple[float, int | None]:
    import os
    import signal
    import subprocess

    t = time.monotonic()
    os.killpg(w.proc.pid, signal.SIGTERM)
    try:
        rc = w.proc.wait(bound)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t
    if rc is None:
        w.kill()
    return took, rc


def test_readiness_false_while_broker_unreachable_and_back_after(proxied, redis_url, tmp_path: Path) -> None:
    """Broker refuses connections: /readyz 503 with broker 'unreachable', the gauge says 0,
    ONE log line for the transition; when it returns: ready again, gauge 1, one line; the
    worker still processes turns; SIGTERM with the broker up exits 0 within the grace."""
    broker, proxy = proxied
    penv = _env(proxy, redis_url)
    w = _start(penv, proxy, tmp_path, "ready")
    try:
        proxy.set_mode("cut")
        t = time.monotonic()
        code, body = wait(lambda: (lambda r: r if r[0] == 503 else None)(_readyz(w)), timeout=45,
                          what="/readyz 503 during the outage")
        took = time.monotonic() - t
        assert body.get("broker") == "unreachable", body
        assert metrics(w).get("evostream_broker_connected") == 0.0
        print(f"readiness false {took:.1f} s after the broker went away")
        time.sleep(5)
        assert _readyz(w)[0] == 503, "readiness flapped back during the outage"
        proxy.heal()
        wait(lambda: _readyz(w)[0] == 200, timeout=90, what="/readyz 200 after the broker returned")
        assert metrics(w).get("evostream_broker_connected") == 1.0
        text = "\n".join(_lines(w))
        assert len(re.findall(r"broker unreachable", text)) == 1, text[-3000:]
        assert len(re.findall(r"broker reachable again", text)) == 1, text[-3000:]
        # and it still does its job
        produce(proxy.address, penv.turns_topic, [turn_record("after-outage", 0, "hello again")])
        wait(lambda: any(m.key == b"after-outage" for m in read_topic_sync(proxy.address, penv.embeddings_topic,
                                                                              idle_ms=500)),
             timeout=90, what="embedding of a turn sent after the outage")
        took, rc = _sigterm_and_time(w, GRACE_S + 20)
        print(f"SIGTERM with the broker up: exit {rc} after {took:.1f} s")
        assert rc == 0 and took <= SIGTERM_BOUND_S, (rc, took, w.tail(30))
    finally:
        w.kill()


def test_log_lines_per_minute_bounded_during_broker_outage(proxied, redis_url, tmp_path: Path) -> None:
    broker, proxy = proxied
    penv = _env(proxy, redis_url)
    w = _start(penv, proxy, tmp_path, "logs")
    try:
        proxy.set_mode("cut")
        time.sleep(3)  # the transition itself may log a few lines; measure the steady state too
        n0, r0 = len(_lines(w)), proxy.refused
        time.sleep(OUTAGE_WINDOW_S)
        n1, r1 = len(_lines(w)), proxy.refused
        per_min = (n1 - n0) * 60.0 / OUTAGE_WINDOW_S
        print(f"{n1 - n0} log lines in {OUTAGE_WINDOW_S:.0f} s of outage = {per_min:.0f}/min; "
              f"{r1 - r0} connection attempts refused by the proxy ({(r1 - r0) / OUTAGE_WINDOW_S:.1f}/s)")
        assert per_min <= LOG_LINES_PER_MIN_MAX, "\n".join(_lines(w)[n0:n0 + 40])
        # reconnects back off (before the fix: about 19 connection attempts a second)
        assert (r1 - r0) / OUTAGE_WINDOW_S <= RECONNECTS_PER_S_MAX, (r1 - r0)
        assert w.alive()
    finally:
        proxy.heal()
        w.kill()


@pytest.mark.parametrize("fault", ["cut", pytest.param("blackhole", marks=pytest.mark.slow)])
def test_sigterm_with_broker_away_exits_within_grace(proxied, redis_url, tmp_path: Path, fault: str) -> None:
    """SIGTERM while the broker is down (cut) or hung (blackhole): the process is gone within
    the grace (+ slack for a loaded machine), and its exit code says the shutdown was not clean."""
    broker, proxy = proxied
    penv = _env(proxy, redis_url)
    w = _start(penv, proxy, tmp_path, f"term-{fault}")
    try:
        proxy.set_mode(fault)
        time.sleep(8)  # the broker has been away for a while (past the unreachable threshold)
        took, rc = _sigterm_and_time(w, 60)
        print(f"SIGTERM with the broker {fault}: exit {rc} after {took:.1f} s")
        assert rc is not None, f"still running 60 s after SIGTERM:\n{w.tail(40)}"
        assert took <= SIGTERM_BOUND_S, (took, w.tail(30))
        assert rc == 75, (rc, w.tail(30))  # not clean: offsets could not be committed
        text = "\n".join(_lines(w))
        assert "shutdown did not finish" in text or "but not cleanly" in text, w.tail(30)
    finally:
        proxy.heal()
        w.kill()


# The offset-after-delivery contract (Produce requests swallowed: nothing delivered, nothing
# acknowledged) runs in the default run: tests/test_delivery_contract.py.
