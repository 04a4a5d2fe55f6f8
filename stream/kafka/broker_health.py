"""Broker connectivity as a first-class state of the worker: connected or unreachable.

Why a probe of our own: faust and aiokafka retry a lost broker forever, quietly from the
outside (the consumer just yields nothing) and loudly in the log (one error per retry, every
100 ms). Nothing tells readiness, metrics or an operator "this worker cannot consume". So the
worker asks the cluster itself, from the same process and through the same network path as its
consumer: a metadata request and a FindCoordinator for its group, with a timeout. No answer
for `unreachable_after_s` => UNREACHABLE (ingestion unhealthy, gauge 0, ONE warning line); the
first answer after that => CONNECTED again (one info line with the outage's length).

While unreachable, the probe backs off exponentially up to a cap, and so does the consumer:
`apply_consumer_backoff` raises the retry interval of aiokafka's loops (metadata, coordinator,
fetch) and `throttle_reconnects` makes every new connection attempt wait the same back-off;
both go back to the configured values once the broker answers. Those are private parts of
aiokafka 0.14 (as `fetch_max_wait_ms` in stream/runtime/worker.py); a version that renames them simply
keeps its fixed back-off (the functions check before they set anything).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from aiokafka.client import AIOKafkaClient, CoordinationType

from stream.backoff import Backoff

log = logging.getLogger(__name__)


class BrokerState(str, Enum):
    UNKNOWN = "unknown"          # no probe has answered yet (starting)
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"  # no answer for unreachable_after_s


class BrokerMonitor:
    """Periodic reachability probe of the Kafka cluster and the group's coordinator."""

    def __init__(self, bootstrap: str, group_id: str, *, interval_s: float = 2.0, timeout_s: float = 5.0,
                 unreachable_after_s: float = 6.0, backoff_max_s: float = 10.0,
                 client_kwargs: dict[str, Any] | None = None,
                 on_change: Callable[[BrokerState, BrokerState], None] | None = None,
                 on_backoff: Callable[[float | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.unreachable_after_s = unreachable_after_s
        self.backoff = Backoff(initial_s=interval_s, max_s=max(interval_s, backoff_max_s))
        self.client_kwargs = dict(client_kwargs or {})
        self.on_change = on_change
        self.on_backoff = on_backoff  # seconds the Kafka clients should wait between retries; None = default
        self.clock = clock
        self.state = BrokerState.UNKNOWN
        self.failures = 0              # consecutive failed probes
        self.last_error = ""
        self.since = clock()           # when the current state began
        self._last_ok: float | None = None
        self._started_at = clock()
        self._client: AIOKafkaClient | None = None
        self._task: asyncio.Task | None = None

    @property
    def reachable(self) -> bool:
        return self.state is BrokerState.CONNECTED

    # -- the decision (pure: tested without a broker) --------------------------------------
    def observe(self, ok: bool, error: str = "") -> BrokerState:
        """Record one probe result; returns the (possibly new) state."""
        now = self.clock()
        # the broker has been silent since its last answer (or since start if it never answered)
        silent_since = self._last_ok if self._last_ok is not None else self._started_at
        if ok:
            self._last_ok = now
            self._set(BrokerState.CONNECTED, now, silent_since)
            self.failures = 0  # after the line, which counts them
        else:
            self.failures += 1
            self.last_error = error
            if now - silent_since >= self.unreachable_after_s:
                self._set(BrokerState.UNREACHABLE, now, silent_since)
        if self.on_backoff is not None:
            self.on_backoff(self.next_delay() if self.state is BrokerState.UNREACHABLE else None)
        return self.state

    def next_delay(self) -> float:
        """Seconds to the next probe: the interval while healthy, capped back-off while not."""
        if self.failures == 0:
            return self.interval_s
        return max(self.interval_s, min(self.backoff.max_s, self.interval_s * 2 ** min(self.failures, 16)))

    def _set(self, new: BrokerState, now: float, silent_since: float) -> None:
        old = self.state
        if new is old:
            return
        self.state = new
        # Both lines give the outage's length, measured from the broker's last answer, not from
        # when the previous state began (issue #18: a minute of uptime was reported as
        # "unreachable for 56.2 s" 4 s into an outage).
        duration = now - silent_since
        self.since = now
        if new is BrokerState.UNREACHABLE:
            log.warning("broker unreachable: no answer from %s (metadata + group coordinator) for %.1f s "
                        "(%s); not consuming, retrying with back-off up to %.0f s", self.bootstrap, duration,
                        self.last_error or "timeout", self.backoff.max_s)
        elif old is BrokerState.UNREACHABLE:
            log.info("broker reachable again after %.1f s unreachable (%d failed probes)", duration, self.failures)
        else:
            log.info("broker reachable at %s", self.bootstrap)
        if self.on_change is not None:
            self.on_change(old, new)

    # -- the probe ------------------------------------------------------------------------
    async def probe(self) -> None:
        """One round trip: bootstrap if needed, cluster metadata, the group's coordinator."""
        if self._client is None:
            client = AIOKafkaClient(bootstrap_servers=self.bootstrap, client_id="evostream-broker-probe",
                                    request_timeout_ms=int(self.timeout_s * 1000), metadata_max_age_ms=3_600_000,
                                    **self.client_kwargs)
            try:
                await client.bootstrap()
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            self._client = client
        md = await self._client.fetch_all_metadata()
        if not md.brokers():
            raise ConnectionError("metadata lists no broker")
        await self._client.coordinator_lookup(CoordinationType.GROUP, self.group_id)

    async def check(self) -> BrokerState:
        try:
            await asyncio.wait_for(self.probe(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure means "no answer"
            await self._drop_client()  # a wedged connection must not poison the next probe
            return self.observe(False, f"{type(exc).__name__}: {exc}"[:200])
        return self.observe(True)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.next_delay())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        await self._drop_client()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(client.close(), 2.0)


def apply_consumer_backoff(consumer: Any, seconds: float) -> bool:
    """Set the retry interval of an aiokafka consumer's client, coordinator and fetcher
    (private attributes of aiokafka 0.14; checked, never created). True if any was set."""
    done = False
    targets = ((getattr(consumer, "_client", None), "_retry_backoff", seconds),
               (getattr(consumer, "_coordinator", None), "_retry_backoff_ms", seconds * 1000),
               (getattr(consumer, "_fetcher", None), "_retry_backoff", seconds))
    for obj, attr, value in targets:
        if obj is not None and isinstance(getattr(obj, attr, None), (int, float)):
            setattr(obj, attr, value)
            done = True
    return done


def throttle_reconnects(client: Any, delay_s: Callable[[], float]) -> bool:
    """Make an aiokafka client wait `delay_s()` seconds before opening a NEW connection to a
    node (an open one is used at once); 0 = no wait. Installed once per client.

    Why: aiokafka retries a lost coordinator in a loop that captured its 100 ms back-off when
    it started, and every failure also forces a metadata refresh that connects again -- measured
    about 20-37 connection attempts a second against a refusing broker, unaffected by
    `apply_consumer_backoff`. Every one of those attempts goes through `_get_conn` (aiokafka
    0.14, private), so waiting there bounds the reconnect rate whatever loop asks. While the
    broker answers, `delay_s()` is 0 and nothing changes."""
    original = getattr(client, "_get_conn", None)
    conns = getattr(client, "_conns", None)
    if original is None or not isinstance(conns, dict) or getattr(client, "_evostream_throttled", False):
        return False

    async def _get_conn(node_id: Any, **kwargs: Any) -> Any:
        delay = delay_s()
        if delay > 0:
            conn = conns.get((node_id, kwargs.get("group", _DEFAULT_GROUP)))
            if conn is None or not conn.connected():
                await asyncio.sleep(delay)
        return await original(node_id, **kwargs)

    client._get_conn = _get_conn
    client._evostream_throttled = True
    return True


try:  # the key aiokafka 0.14 files default-group connections under
    from aiokafka.client import ConnectionGroup as _ConnectionGroup

    _DEFAULT_GROUP: Any = _ConnectionGroup.DEFAULT
except ImportError:  # pragma: no cover - another aiokafka layout: wait on every new connection
    _DEFAULT_GROUP = None
