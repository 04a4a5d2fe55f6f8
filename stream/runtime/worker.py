"""One worker process: everything it holds (engine, memory-state store, producer, pipeline,
broker monitor, metrics) and its lifetime, from start to a bounded shutdown.

The faust application it runs is built in stream/runtime/app.py; the data path itself is
stream/processing/ (decode -> admit -> step -> commit).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust.worker import Worker as FaustWorker

from stream.kafka.broker_health import BrokerMonitor, BrokerState, apply_consumer_backoff, throttle_reconnects
from stream.kafka.connect import ConnectConventions
from stream.kafka.emitter import KafkaEmitter
from stream.kafka.lag import LagGauge
from stream.kafka.security import KafkaSecurity
from stream.kafka.unreadable import watch_app
from stream.processing.dead_letters import OversizeHandler
from stream.processing.pipeline import TurnPipeline
from stream.runtime.app import build_app
from stream.runtime.logs import worker_logging_config
from stream.runtime.metrics import Metrics
from stream.runtime.model_thread import ModelThread
from stream.runtime.shutdown import ShutdownGuard
from stream.settings import Settings
from stream.state.cold_tier import store_levers
from stream.state.redis_client import RedisOptions
from stream.state.store import MemoryStore
from workers.engine import EvoEngine

log = logging.getLogger(__name__)


class Worker:
    """Everything one worker process holds: engine, store, pipeline, the faust app."""

    def __init__(self, settings: Settings, engine: EvoEngine):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self.lag = LagGauge(self.metrics.lag, settings.turns_topic)  # issue #11: owned partitions only
        # One thread owns the model: steps and queries queue behind each other on it.
        # (stream/runtime/model_thread.py: also tells the query API whether ingestion is busy, issue #9)
        self.executor = ModelThread(thread_name_prefix="evo-model")
        self.store = MemoryStore(
            settings.redis_url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
            capacity=engine.capacity, dtype=engine.state_dtype, namespace=settings.redis_namespace,
            ttl_s=settings.state_ttl_s, marker_ttl_s=settings.marker_ttl_s, compact_every=settings.compact_every,
            writer_id=settings.worker_id, durability=settings.redis_durability,
            durability_replicas=settings.redis_durability_replicas,
            durability_timeout_ms=settings.redis_durability_timeout_ms,
            redis_options=RedisOptions.from_settings(settings),  # issue #8: TLS files, password file
            **store_levers(settings))  # issue #14: storage dtype, per-tenant TTL, cold tier

        # Kafka TLS/SASL (issue #8): one resolved object for the emitter and faust's clients.
        self.kafka_security = KafkaSecurity.from_settings(settings)
        # Records are bounded by the broker's limit (issue #8): the client refuses what the
        # broker would, and a refused record is replaced (a dead letter cut smaller), never
        # retried for ever.
        self.oversize = OversizeHandler(dead_letter_topic=settings.dead_letter_topic,
                                        embeddings_topic=settings.embeddings_topic,
                                        limit=settings.kafka_max_message_bytes, worker=settings.worker_id)
        self.emitter = KafkaEmitter(settings.kafka_bootstrap, idempotent=settings.producer_idempotence,
                                    security=self.kafka_security,
                                    compression=settings.output_compression,
                                    on_retry=self.metrics.emit_retries.inc,  # issue #12
                                    linger_ms=settings.producer_linger_ms,
                                    max_request_size=settings.kafka_max_message_bytes,
                                    connect=ConnectConventions.from_settings(settings),  # issue #19
                                    on_too_large=self.oversize)
        self.pipeline = TurnPipeline(engine, self.store, self.emitter, settings, self.executor, self.metrics)
        # issue #17: nothing is processed before the store's identity is checked (app.py start-up)
        self.store.epoch.required = True
        self.store.epoch.listeners.append(self._on_store_verdict)
        self.ready = False
        self.store_ready = False  # Redis checked (reachable, safe config, scripts loaded) at start
        engine.set_prefix_cache_hook(self._on_prefix_cache_event)  # issue #10 cache -> Prometheus
        engine.set_query_cache_hook(self._on_query_cache_event)    # issue #22
        self.metrics.compute_info.labels(  # issue #22: which precision (and kernels) this worker runs
            dtype=str(engine.compute_dtype).removeprefix("torch."), memory_dtype=str(engine.state_dtype).removeprefix("torch."),
            bf16_kernel=engine.precision.bf16_kernel if engine.precision is not None else "").set(1)
        for name, n in (("prefix", engine.config.prefix_cache_max_bytes), ("query", engine.config.query_cache_max_bytes)):
            self.metrics.cache_budget_bytes.labels(cache=name).set(n)
        self.batches = 0
        # Broker connectivity and bounded shutdown (issue #12): readiness needs the broker to
        # answer; SIGTERM stops taking batches (see stream/runtime/shutdown.py, run_worker).
        self.stopping = False
        self.broker_unreachable_at_shutdown = False
        self._reconnect_delay_s = 0.0  # > 0 while the broker is unreachable (stream/kafka/broker_health.py)
        self.broker = BrokerMonitor(
            settings.kafka_bootstrap, settings.group_id, interval_s=settings.broker_probe_interval_s,
            timeout_s=settings.broker_probe_timeout_s, unreachable_after_s=settings.broker_unreachable_after_s,
            backoff_max_s=settings.broker_retry_backoff_max_s, client_kwargs=self.kafka_security.client_kwargs(),
            on_change=self._on_broker_change, on_backoff=self._set_consumer_backoff)
        self.metrics.broker_connected.set(0)
        self.app = build_app(self)
        # An unreadable record batch stops its partition, not the worker (issue #13).
        self.unreadable = watch_app(self.metrics.registry)

    def _on_prefix_cache_event(self, event: str, nbytes: int) -> None:
        """Called on the model thread by the segment-prefix cache (prometheus_client is
        thread-safe)."""
        self.metrics.prefix_cache_events.labels(event=event).inc()
        cache = self.engine.prefix_cache
        if cache is not None:
            self.metrics.prefix_cache_bytes.set(cache.bytes)

    # -- the store (issue #17) ----------------------------------------------------------------
    def _on_store_verdict(self, was: str | None, kind: str | None, problem: str | None) -> None:
        self.metrics.store_lost.set(1 if kind == "lost" else 0)
        if kind == "lost" and was != "lost":
            self.metrics.store_lost_total.inc()

    def store_status(self) -> tuple[str, str | None]:
        """(state, why) of the memory-state store for readiness and /health: ok, starting,
        lost, building, full, unavailable."""
        watch = self.store.epoch
        if watch.kind is not None:
            return watch.kind, watch.problem
        if not self.store_ready or not watch.opened:
            return "starting", None
        if self.pipeline.paused:
            return self.pipeline.guard.reason or "unavailable", None
        return "ok", None

    # -- broker connectivity and shutdown (issue #12) --------------------------------------------
    def drop_model_caches(self) -> None:
        """On the model thread, after a revoke: the engine's per-conversation caches go (issue #22;
        the conversations may now be advanced by another worker: entries would only miss)."""
        self.engine.drop_conversation_caches()
        self.metrics.prefix_cache_bytes.set(0)
        self.metrics.query_cache_bytes.set(0)

    def _on_query_cache_event(self, event: str, nbytes: int) -> None:
        """The same for the query-ready memory (issue #22)."""
        self.metrics.query_cache_events.labels(event=event).inc()
        cache = self.engine.query_cache
        if cache is not None:
            self.metrics.query_cache_bytes.set(cache.bytes)

    def _on_broker_change(self, old: BrokerState, new: BrokerState) -> None:
        self.metrics.broker_connected.set(1 if new is BrokerState.CONNECTED else 0)
        if new is BrokerState.UNREACHABLE:
            self.metrics.broker_unreachable.inc()

    def _set_consumer_backoff(self, seconds: float | None) -> None:
        """While the broker is unreachable, aiokafka's retry loops (metadata, coordinator,
        fetch) back off like our probe does, up to the cap; default again once it answers."""
        try:
            consumer = getattr(getattr(self.app.consumer, "_thread", None), "_consumer", None)
        except Exception:  # noqa: BLE001 - the consumer may not exist yet
            return
        if consumer is None:
            return
        client = getattr(consumer, "_client", None)
        if getattr(self, "_default_backoff_s", None) is None:
            self._default_backoff_s = getattr(client, "_retry_backoff", 0.1)
            if client is not None:  # new connections wait the back-off while unreachable
                throttle_reconnects(client, lambda: self._reconnect_delay_s)
        self._reconnect_delay_s = 0.0 if seconds is None else seconds
        apply_consumer_backoff(consumer, self._default_backoff_s if seconds is None else seconds)

    def begin_shutdown(self) -> None:
        """First SIGTERM/SIGINT: take no new batch, report not ready."""
        self.stopping = True
        self.ready = False
        self.broker_unreachable_at_shutdown = self.broker.state is BrokerState.UNREACHABLE

    async def close_clients(self, timeout_s: float = 5.0) -> None:
        """Close what faust does not own (probe, producer), each bounded: with the broker away
        a producer's stop would wait for deliveries that cannot happen."""
        for what, closer in (("broker probe", self.broker.stop), ("producer", self.emitter.stop)):
            try:
                await asyncio.wait_for(closer(), timeout_s)
            except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                log.warning("closing the %s did not finish (%s: %s)", what, type(exc).__name__, exc)


def run_worker(settings: Settings, engine: EvoEngine) -> None:
    """Blocking: run one worker until SIGTERM/SIGINT (faust handles the signals; the process
    is gone within `shutdown_grace_s` either way, see stream/runtime/shutdown.py)."""
    w = Worker(settings, engine)

    guard = ShutdownGuard(settings.shutdown_grace_s, on_begin=w.begin_shutdown)

    class BoundedWorker(FaustWorker):
        def _schedule_shutdown(self, signal: Any) -> None:
            guard.begin(getattr(signal, "name", str(signal)))
            super()._schedule_shutdown(signal)

    try:
        BoundedWorker(w.app, loglevel=settings.log_level.lower(), quiet=True, logging_config=worker_logging_config(settings),
                      redirect_stdouts=False).execute_from_commandline()
    except SystemExit as exc:
        if exc.code in (0, None) and guard.stopping:
            unreachable = w.broker_unreachable_at_shutdown or w.broker.state is BrokerState.UNREACHABLE
            code = guard.finished(clean=not unreachable, why="the broker was unreachable")
            raise SystemExit(code) from None
        raise
