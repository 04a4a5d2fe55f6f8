"""The faust application: the turns topic feeds one agent that hands micro-batches to the
pipeline, plus the HTTP endpoints (query, health, readiness, metrics).

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.web import Request, Response, View
from pydantic import ValidationError

from schemas.events import QueryRequest, QueryResponse
from schemas.vectors import encode_vector
from stream.checkpoints import CheckpointStore, FingerprintMismatch
from stream.emitter import KafkaEmitter
from stream.metrics import Metrics
from stream.pipeline import InboundRecord, TurnPipeline
from stream.recovery import StoreUnavailable
from stream.settings import Settings
from workers.engine import EvoEngine

log = logging.getLogger(__name__)


class Worker:
    """Everything one worker process holds: engine, store, pipeline, the faust app."""

    def __init__(self, settings: Settings, engine: EvoEngine):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        # One thread owns the model: steps and queries queue behind each other on it.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evo-model")
        self.store = CheckpointStore(
            settings.redis_url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
            capacity=engine.capacity, dtype=engine.state_dtype, namespace=settings.redis_namespace,
            ttl_s=settings.state_ttl_s, compact_every=settings.compact_every, writer_id=settings.worker_id)
        from schemas.events import dead_letter_size_bound

        self.emitter = KafkaEmitter(settings.kafka_bootstrap, idempotent=settings.producer_idempotence,
                                    linger_ms=settings.producer_linger_ms,
                                    max_request_size=dead_letter_size_bound(settings.max_record_bytes) + 65536)
        self.pipeline = TurnPipeline(engine, self.store, self.emitter, settings, self.executor, self.metrics)
        self.ready = False
        self.batches = 0
        self.app = self._build_app()

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
            broker=f"kafka://{s.kafka_bootstrap}",
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
                worker._update_lag(app)

        @app.on_partitions_revoked.connect
        async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
            mine = {tp.partition for tp in revoked if tp.topic == s.turns_topic}
            # Not ready until the rebalance hands out a new assignment: a member stuck in a
            # rebalance owns nothing and must not look healthy-and-serving.
            worker.ready = False
            dropped = worker.pipeline.cache.drop_partitions(mine)
            log.info("partitions revoked %s: dropped %d cached conversation states", sorted(mine), dropped)

        @app.on_partitions_assigned.connect
        async def on_assigned(sender: Any, assigned: set, **kwargs: Any) -> None:
            parts = sorted(tp.partition for tp in assigned if tp.topic == s.turns_topic)
            log.info("partitions assigned %s (states load lazily from Redis)", parts)
            worker.ready = True

        @app.task
        async def startup() -> None:
            await worker.emitter.start()
            await worker.store.wait_until_available()
            await worker.store.prepare()
            log.info("worker %s started: model %s (%s), checkpoint fingerprint %s", s.worker_id,
                     worker.engine.model_name, s.device, worker.engine.fingerprint)

        self._register_views(app)
        return app

    def _update_lag(self, app: faust.App) -> None:
        try:
            for (topic, partition), off in self.pipeline.last_offsets.items():
                from faust.types import TP

                hw = app.consumer.highwater(TP(topic, partition))
                if hw is not None:
                    self.metrics.lag.labels(partition=str(partition)).set(max(0, hw - off - 1))
        except Exception:  # noqa: BLE001 - metrics must never break the stream
            pass

    # ------------------------------------------------------------------------------------------
    def _register_views(self, app: faust.App) -> None:
        worker = self

        @app.page("/healthz")
        class Health(View):
            async def get(self, request: Request) -> Response:
                return self.json({"status": "ok", "worker": worker.settings.worker_id, "batches": worker.batches})

        @app.page("/readyz")
        class Ready(View):
            async def get(self, request: Request) -> Response:
                ok = worker.ready and not worker.pipeline.paused
                body = {"ready": ok, "assigned": worker.ready, "paused": worker.pipeline.paused}
                return self.json(body, status=200 if ok else 503)

        @app.page("/metrics")
        class MetricsView(View):
            async def get(self, request: Request) -> Response:
                return self.bytes(worker.metrics.render(), content_type="text/plain; version=0.0.4")

        @app.page("/v1/query")
        class Query(View):
            async def post(self, request: Request) -> Response:
                raw = await request.read()
                try:
                    req = QueryRequest.model_validate_json(raw)
                except ValidationError as exc:
                    return self.json({"error": "invalid query request", "detail": json.loads(exc.json())}, status=400)
                try:
                    resp = await worker.query(req)
                except FingerprintMismatch as exc:
                    return self.json({"error": str(exc)}, status=409)
                except StoreUnavailable as exc:
                    return self.json({"error": f"checkpoint store unavailable: {exc}"}, status=503)
                return self.bytes(resp.model_dump_json().encode(), content_type="application/json")

    async def query(self, req: QueryRequest) -> QueryResponse:
        """Embed a query against the conversation's live memory (the latest checkpoint;
        a conversation this worker owns is served from its in-memory state)."""
        state = self.pipeline.cache.get(req.conversation_id)
        if state is None:
            ck = await self.store.load(req.conversation_id)
            state = ck.state if ck is not None else None
        loop = asyncio.get_running_loop()
        vec = (await loop.run_in_executor(self.executor, self.engine.embed_queries, [(state, req.query)]))[0]
        self.metrics.queries.inc()
        return QueryResponse(
            conversation_id=req.conversation_id, vector=encode_vector(vec), dim=int(vec.shape[0]),
            memory_len=state.memory_len if state is not None else 0,
            applied_seq=state.seq if state is not None else -1,
            checkpoint=self.engine.fingerprint, model=self.engine.model_name[:256] or "evoembedding")


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
    """Blocking: run one worker until SIGTERM/SIGINT (faust handles the signals)."""
    w = Worker(settings, engine)
    from faust.worker import Worker as FaustWorker

    handlers = ["json"] if settings.log_json else ["plain"]
    logging_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "stream.logs.JsonFormatter"},
                       "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
                     "plain": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"level": settings.log_level.upper(), "handlers": handlers},
        "loggers": {name: {"level": "WARNING"} for name in ("aiokafka", "faust", "mode", "transformers")},
    }
    FaustWorker(w.app, loglevel=settings.log_level.lower(), quiet=True, logging_config=logging_config,
                redirect_stdouts=False).execute_from_commandline()
