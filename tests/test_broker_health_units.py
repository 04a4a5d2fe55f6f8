"""The decisions behind broker connectivity, log limiting and bounded shutdown, in isolation
(the real-process tests are in tests/test_broker_faults.py)."""

from __future__ import annotations

import logging
import time

import pytest

from stream.kafka.broker_health import BrokerMonitor, BrokerState, apply_consumer_backoff
from stream.runtime.log_limits import RepeatLimitFilter
from stream.runtime.shutdown import EXIT_GRACE_EXCEEDED, ShutdownGuard


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_unreachable_only_after_the_threshold_and_one_change_per_transition() -> None:
    clock = Clock()
    changes: list[tuple[BrokerState, BrokerState]] = []
    backoffs: list[float | None] = []
    m = BrokerMonitor("x:1", "g", interval_s=1, unreachable_after_s=5, backoff_max_s=8,
                      on_change=lambda a, b: changes.append((a, b)), on_backoff=backoffs.append, clock=clock)
    assert m.observe(True) is BrokerState.CONNECTED
    for t in (1, 2, 3, 4):
        clock.t = t
        assert m.observe(False, "refused") is BrokerState.CONNECTED  # a blip is not an outage
    delays = []
    for t in (5, 7, 11, 19, 27, 35):
        clock.t = t
        assert m.observe(False, "refused") is BrokerState.UNREACHABLE
        delays.append(m.next_delay())
    assert delays == sorted(delays) and max(delays) == 8, delays  # exponential, capped
    clock.t = 40
    assert m.observe(True) is BrokerState.CONNECTED
    assert m.next_delay() == 1
    assert changes == [(BrokerState.UNKNOWN, BrokerState.CONNECTED),
                       (BrokerState.CONNECTED, BrokerState.UNREACHABLE),
                       (BrokerState.UNREACHABLE, BrokerState.CONNECTED)]
    assert backoffs[-1] is None and max(b for b in backoffs if b is not None) == 8


def test_never_reached_broker_becomes_unreachable_after_threshold() -> None:
    clock = Clock()
    m = BrokerMonitor("x:1", "g", unreachable_after_s=3, clock=clock)
    clock.t = 2
    assert m.observe(False) is BrokerState.UNKNOWN
    clock.t = 3
    assert m.observe(False) is BrokerState.UNREACHABLE


def test_consumer_backoff_sets_existing_attributes_only() -> None:
    class Obj:
        pass

    c = Obj()
    c._client, c._coordinator, c._fetcher = Obj(), Obj(), Obj()
    c._client._retry_backoff, c._coordinator._retry_backoff_ms, c._fetcher._retry_backoff = 0.1, 100, 0.1
    assert apply_consumer_backoff(c, 4.0)
    assert (c._client._retry_backoff, c._coordinator._retry_backoff_ms, c._fetcher._retry_backoff) == (4.0, 4000, 4.0)
    assert not apply_consumer_backoff(Obj(), 4.0)


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_repeat_limit_summarises_library_lines_and_keeps_ours() -> None:
    clock = Clock()
    f = RepeatLimitFilter(window_s=60, burst=2, clock=clock)
    passed = [f.filter(_record("aiokafka.conn", "Unable connect to node with id %s: %s", n, "refused"))
              for n in range(100)]
    assert sum(passed) == 2
    # digits in the template are masked: "node 1" and "node 2" are one kind of line
    assert f.filter(_record("aiokafka.client", "Unable connect to node 1"))
    assert f.filter(_record("aiokafka.client", "Unable connect to node 2"))
    assert not f.filter(_record("aiokafka.client", "Unable connect to node 3"))
    assert all(f.filter(_record("stream.processing.pipeline", "dead-letter %s", i)) for i in range(50))  # ours: untouched
    clock.t = 61
    rec = _record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, "refused")
    assert f.filter(rec)
    assert "98 similar line(s) suppressed" in rec.getMessage()


def test_shutdown_guard_exits_after_grace_unless_finished() -> None:
    codes: list[int] = []
    began: list[bool] = []
    g = ShutdownGuard(0.2, on_begin=lambda: began.append(True), exit=codes.append)
    g.begin("SIGTERM")
    g.begin("SIGTERM")  # a second signal changes nothing
    time.sleep(0.6)
    assert began == [True] and codes == [EXIT_GRACE_EXCEEDED]
    codes.clear()
    g2 = ShutdownGuard(0.3, exit=codes.append)
    g2.begin("SIGTERM")
    g2.finished()
    time.sleep(0.6)
    assert codes == []


def test_throttle_waits_only_for_new_connections_while_delay_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from stream.kafka.broker_health import throttle_reconnects

    class Conn:
        def __init__(self, up: bool) -> None:
            self.up = up

        def connected(self) -> bool:
            return self.up

    class Client:
        def __init__(self) -> None:
            self._conns: dict = {}
            self.calls = 0

        async def _get_conn(self, node_id, **kw):
            self.calls += 1
            return None

    delay = {"s": 0.0}
    c = Client()
    assert throttle_reconnects(c, lambda: delay["s"])
    assert not throttle_reconnects(c, lambda: 1.0)  # once per client

    # What the throttle waits is recorded, not timed (a loaded machine makes wall time useless
    # for "no wait"): the module's asyncio.sleep is replaced by a recorder.
    import types

    from stream.kafka import broker_health

    waits: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(broker_health, "asyncio", types.SimpleNamespace(sleep=recorded_sleep))

    async def waited(node) -> list[float]:
        before = len(waits)
        await c._get_conn(node)
        return waits[before:]

    async def run() -> None:
        from stream.kafka.broker_health import _DEFAULT_GROUP

        assert await waited(1) == []             # broker answering: no wait
        delay["s"] = 0.3
        assert await waited(1) == [0.3]          # unreachable, no connection: wait
        c._conns[(2, _DEFAULT_GROUP)] = Conn(True)
        assert await waited(2) == []             # an open connection is used at once
        assert c.calls == 3

    asyncio.run(run())
