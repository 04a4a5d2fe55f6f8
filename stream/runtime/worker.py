"""The faust application: the turns topic feeds one agent that hands micro-batches to the
pipeline; every HTTP endpoint (query, health, readiness, metrics) is installed by stream/api/.

Why `noack_take` and manual acks: faust's `take()` acknowledges a batch when the loop body
exits *for any reason*, including an exception or the task being cancelled at shutdown, which
would commit offsets of turns that were never checkpointed (faust-streaming #315, #606). Here
a record is acknowledged only after `pipeline.process` returned, i.e. after its checkpoint and
its embedding are durable. One agent instance (concurrency=1) keeps per-partition order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import faust

from stream.kafka.broker_health import BrokerMonitor, BrokerState, apply_consumer_backoff, throttle_reconnects
from stream.state.store import CheckpointStore, UnsafeRedisConfig
from stream.kafka.emitter import KafkaEmitter
from stream.kafka.security import KafkaSecurity
from stream.state.redis_client import RedisOptions
from stream.api import register_api
from stream.kafka.lag import LagGauge
from stream.runtime.metrics import Metrics
from stream.runtime.model_thread import ModelThread
from stream.state.cold_tier import store_levers
from stream.processing.pipeline import InboundRecord, TurnPipeline
from stream.kafka.unreadable import disable_codecs_for_tests, watch_app
from stream.settings import Settings
from stream.runtime.shutdown import ShutdownGuard
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
        self.store = CheckpointStore(
            settings.redis_url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
            capacity=engine.capacity, dtype=engine.state_dtype, namespace=settings.redis_namespace,
            ttl_s=settings.state_ttl_s, marker_ttl_s=settings.marker_ttl_s, compact_every=settings.compact_every,
            writer_id=settings.worker_id, durability=settings.redis_durability,
            durability_replicas=settings.redis_durability_replicas,
            durability_timeout_ms=settings.redis_durability_timeout_ms,
            redis_options=RedisOptions.from_settings(settings),  # issue #8: TLS files, password file
            **store_levers(settings))  # issue #14: storage dtype, per-tenant TTL, cold tier
        from stream.processing.dead_letters import OversizeHandler

        disable_codecs_for_tests()  # TEST-ONLY hook (issue #13), before any client is configured
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
                                    on_too_large=self.oversize)
        self.pipeline = TurnPipeline(engine, self.store, self.emitter, settings, self.executor, self.metrics)
        self.ready = False
        self.store_ready = False  # Redis checked (reachable, safe config, scripts loaded) at start
        engine.set_prefix_cache_hook(self._on_prefix_cache_event)  # issue #10 cache -> Prometheus
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
        self.app = self._build_app()
        # An unreadable record batch stops its partition, not the worker (issue #13).
        self.unreadable = watch_app(self.metrics.registry)

    # ------------------------------------------------------------------------------------------
    def _build_app(self) -> faust.App:
        s = self.settings
        _set_fetch_max_wait(s.fetch_max_wait_ms)
        # faust wants a data dir (for tables, which we do not use); keep it out of the cwd
        datadir = Path(tempfile.gettempdir()) / "evostream-faust" / f"{s.group_id}-{os.getpid()}"
        datadir.parent.mkdir(parents=True, exist_ok=True)
        app = faust.App(
            s.group_id,
            datadir=str(datadir),
            # one URL per bootstrap server (explicit; faust would also split "h1:9092,h2:9092")
            broker=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",") if h.strip()],
            broker_credentials=self.kafka_security.faust_credentials(),
            autodiscover=False,
            store="memory://",
            topic_allow_declare=False,        # topics are created by `evostream topics`/deploy
            topic_disable_leader=True,        # no faust leader topic on the broker
            broker_session_timeout=s.session_timeout_s,
            broker_rebalance_timeout=s.rebalance_timeout_s,
            broker_heartbeat_interval=s.heartbeat_interval_s,
            broker_commit_interval=s.commit_interval_s,
            consumer_auto_offset_reset="earliest",
            stream_wait_empty=False,
            web_enabled=True,
            # faust's own /router and /table views: topology and table access we do not serve,
            # outside the API's auth and error shape (issue #9)
            web_router_enabled=False,
            web_tables_enabled=False,
            web_bind=s.web_host,
            web_port=s.web_port,
            web_host=s.web_host,
            producer_max_request_size=4 * 1024 * 1024,
            consumer_max_fetch_size=max(4 * 1024 * 1024, s.max_record_bytes * 2),
        )
        turns = app.topic(s.turns_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=s.turns_partitions)
        worker = self

        @app.agent(turns, concurrency=1, name="evostream-turns")
        async def process(stream: faust.StreamT) -> None:
            async for events in stream.noack_take(s.batch_max_turns, within=max(s.batch_max_wait_ms, 1) / 1000):
                records = [
                    InboundRecord(topic=e.message.topic, partition=e.message.partition, offset=e.message.offset,
                                  key=e.message.key, value=e.message.value,
                                  timestamp_ms=int(e.message.timestamp * 1000) if e.message.timestamp else None)
                    for e in events
                ]
                if worker.stopping:  # shutting down (issue #12): not processed, not acked -> replayed
                    continue
                try:
                    await worker.pipeline.process(records)
                except Exception:  # noqa: BLE001 - see below
                    # Never let faust restart the agent past an unprocessed batch: the next
                    # turns of those conversations would be applied over a hole. Die instead;
                    # the records were not acknowledged, so the restarted worker (or the group
                    # member that takes over) replays them.
                    log.critical("unexpected error processing a batch of %d records; exiting so that they are "
                                 "replayed", len(records), exc_info=True)
                    logging.shutdown()
                    os._exit(70)
                for e in events:
                    await stream.ack(e)
                worker.batches += 1
                for r in records:
                    worker.lag.processed(r.partition, r.offset)
                await worker._update_lag(app)

        @app.on_partitions_revoked.connect
        async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
            mine = {tp.partition for tp in revoked if tp.topic == s.turns_topic}
            # Not ready until the rebalance hands out a new assignment: a member stuck in a
            # rebalance owns nothing and must not look healthy-and-serving.
            worker.ready = False
            # revoke, not just drop: a batch still in flight must not put them back afterwards
            dropped = worker.pipeline.cache.revoke(mine)
            worker.lag.revoke(mine)
            worker.unreadable.forget(s.turns_topic, mine)
            log.info("partitions revoked %s: dropped %d cached conversation states", sorted(mine), dropped)

        @app.on_partitions_assigned.connect
        async def on_assigned(sender: Any, assigned: set, **kwargs: Any) -> None:
            parts = sorted(tp.partition for tp in assigned if tp.topic == s.turns_topic)
            worker.pipeline.cache.assign(set(parts))
            log.info("partitions assigned %s (states load lazily from Redis)", parts)
            worker.lag.assign(parts)
            # issue #11: the line an operator waits for
            log.info("ready: %d partition%s of %s %s, listening on http://%s:%d", len(parts),
                     "" if len(parts) == 1 else "s", s.turns_topic, parts, s.web_host, s.web_port)
            worker.ready = True

        @app.timer(interval=2.0)
        async def lag_refresh() -> None:  # issue #11: the gauge moves while no batch arrives too
            await worker._update_lag(app)

        @app.task
        async def startup() -> None:
            worker.broker.start()  # issue #12: first, so that an unreachable broker shows at once
            try:
                await worker.emitter.start()
            except Exception as exc:  # noqa: BLE001 - broker away at start: send_all starts it later
                log.warning("producer not started (%s: %s); it is retried with the first emit", type(exc).__name__, exc)
            try:
                await worker.store.check_credentials()
                await worker.store.wait_until_available()
                redis_cfg = await worker.store.check_server(allow_eviction=s.redis_allow_eviction)
            except UnsafeRedisConfig as exc:
                # One clear line and a distinct exit code (78, EX_CONFIG): a restart loop
                # cannot fix a server setting.
                log.critical("refusing to start: %s", exc)
                logging.shutdown()
                os._exit(78)
            await worker.store.prepare()
            worker.store_ready = True
            log.info("checkpoint store ok: maxmemory-policy %s, appendonly %s, durability %s",
                     redis_cfg["maxmemory_policy"], "on" if redis_cfg["aof_enabled"] == "1" else "off",
                     s.redis_durability.value)
            log.info("worker %s started: model %s (%s), checkpoint fingerprint %s", s.worker_id,
                     worker.engine.model_name, s.device, worker.engine.fingerprint)

        @app.on_before_shutdown.connect
        async def close_clients(sender: Any, **kwargs: Any) -> None:
            await worker.close_clients()

        self.api = register_api(app, self)  # all HTTP, probes and /metrics included: stream/api/ (#9, #21)
        return app

    def _on_prefix_cache_event(self, event: str, nbytes: int) -> None:
        """Called on the model thread by the segment-prefix cache (prometheus_client is
        thread-safe)."""
        self.metrics.prefix_cache_events.labels(event=event).inc()
        cache = self.engine.prefix_cache
        if cache is not None:
            self.metrics.prefix_cache_bytes.set(cache.bytes)

    # -- broker connectivity and shutdown (issue #12) --------------------------------------------
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

    async def _update_lag(self, app: faust.App) -> None:
        """Consumer lag of the partitions this worker owns (stream/kafka/lag.py, issue #11)."""
        from faust.types import TP

        topic = self.settings.turns_topic
        try:
            await self.lag.refresh(lambda p: app.consumer.highwater(TP(topic, p)),
                                   lambda p: app.consumer.position(TP(topic, p)))
        except Exception:  # noqa: BLE001 - metrics must never break the stream
            log.debug("lag refresh failed", exc_info=True)


def _set_fetch_max_wait(ms: int) -> None:
    """faust creates its consumer with fetch_max_wait_ms=1500 and offers no setting. Brokers
    that hold a fetch until that wait expires (tansu does, measured: p50 ~500 ms per hop) then
    add it to every turn's latency. We wrap faust's factory and set aiokafka's (private but
    long-stable) attribute before the consumer starts its fetcher."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    cls = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(cls, "_evostream_original_create", None) or cls._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    cls._evostream_original_create = original
    cls._create_worker_consumer = create


def run_worker(settings: Settings, engine: EvoEngine) -> None:
    """Blocking: run one worker until SIGTERM/SIGINT (faust handles the signals; the process
    is gone within `shutdown_grace_s` either way, see stream/runtime/shutdown.py)."""
    w = Worker(settings, engine)
    from faust.worker import Worker as FaustWorker

    guard = ShutdownGuard(settings.shutdown_grace_s, on_begin=w.begin_shutdown)

    class BoundedWorker(FaustWorker):
        def _schedule_shutdown(self, signal: Any) -> None:
            guard.begin(getattr(signal, "name", str(signal)))
            super()._schedule_shutdown(signal)

    handlers = ["json"] if settings.log_json else ["plain"]
    logging_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "stream.runtime.logs.JsonFormatter"},
                       "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        # issue #12: the Kafka client libraries' repeated lines (one per retry) are summarised
        "filters": {"repeat_limit": {"()": "stream.runtime.log_limits.RepeatLimitFilter",
                                     "window_s": settings.log_repeat_window_s, "burst": settings.log_repeat_burst}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
                              "filters": ["repeat_limit"]},
                     "plain": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr",
                               "filters": ["repeat_limit"]}},
        "root": {"level": settings.log_level.upper(), "handlers": handlers},
        "loggers": {name: {"level": "WARNING"} for name in ("aiokafka", "faust", "mode", "transformers")},
    }
    try:
        BoundedWorker(w.app, loglevel=settings.log_level.lower(), quiet=True, logging_config=logging_config,
                      redirect_stdouts=False).execute_from_commandline()
    except SystemExit as exc:
        if exc.code in (0, None) and guard.stopping:
            unreachable = w.broker_unreachable_at_shutdown or w.broker.state is BrokerState.UNREACHABLE
            code = guard.finished(clean=not unreachable, why="the broker was unreachable")
            raise SystemExit(code) from None
        raise
