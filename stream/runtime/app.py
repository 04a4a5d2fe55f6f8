"""The faust application of a worker: the turns topic feeds one agent that hands micro-batches
to the pipeline; rebalances, the lag timer and the start-up checks.

Why `noack_take` and manual acks: faust's `take()` acknowledges a batch when the loop body
exits *for any reason*, including an exception or the task being cancelled at shutdown, which
would commit offsets of turns that were never checkpointed (faust-streaming #315, #606). Here
a record is acknowledged by the pipeline's commit protocol, as its last step, after its state
and its embedding are durable (stream/processing/commit.py). One agent instance
(concurrency=1) keeps per-partition order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from faust.types import TP

from stream.api import register_api
from stream.kafka.consumer import set_fetch_max_wait
from stream.kafka.group_offsets import committed_offsets
from stream.processing.records import InboundRecord
from stream.state.availability import StoreUnavailable
from stream.state.errors import UnsafeRedisConfig

if TYPE_CHECKING:  # the worker builds the app; importing it here at run time would be a cycle
    from stream.runtime.worker import Worker

log = logging.getLogger(__name__)


def build_app(worker: "Worker") -> faust.App:
    s = worker.settings
    set_fetch_max_wait(s.fetch_max_wait_ms)
    # faust wants a data dir (for tables, which we do not use); keep it out of the cwd
    datadir = Path(tempfile.gettempdir()) / "evostream-faust" / f"{s.group_id}-{os.getpid()}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.group_id,
        datadir=str(datadir),
        # one URL per bootstrap server (explicit; faust would also split "h1:9092,h2:9092")
        broker=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",") if h.strip()],
        broker_credentials=worker.kafka_security.faust_credentials(),
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

            async def acknowledge(_records: list[InboundRecord], events: list = events) -> None:
                for e in events:
                    await stream.ack(e)

            try:
                # the batch's whole commit protocol, acknowledgement last (processing/commit.py)
                await worker.pipeline.process(records, acknowledge)
            except UnsafeRedisConfig as exc:  # issue #17: a store of another model or precision was adopted
                refuse(exc)
            except Exception:  # noqa: BLE001 - see below
                # Never let faust restart the agent past an unprocessed batch: the next
                # turns of those conversations would be applied over a hole. Die instead;
                # the records were not acknowledged, so the restarted worker (or the group
                # member that takes over) replays them.
                log.critical("unexpected error processing a batch of %d records; exiting so that they are "
                             "replayed", len(records), exc_info=True)
                logging.shutdown()
                os._exit(70)
            worker.batches += 1
            for r in records:
                worker.lag.processed(r.partition, r.offset)
            await update_lag(worker, app)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        mine = {tp.partition for tp in revoked if tp.topic == s.turns_topic}
        # Not ready until the rebalance hands out a new assignment: a member stuck in a
        # rebalance owns nothing and must not look healthy-and-serving.
        worker.ready = False
        # revoke, not just drop: a batch still in flight must not put them back afterwards
        dropped = worker.pipeline.cache.revoke(mine)
        # issue #22: the model-side caches too, on the model thread (after any step in flight)
        worker.executor.submit(worker.drop_model_caches)
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

    @app.timer(interval=s.store_check_interval_s)
    async def store_check() -> None:  # issue #17: an emptied or rolled-back store, also while idle
        if not worker.store.epoch.opened or worker.stopping:
            return
        try:
            await worker.store.epoch.check()
        except StoreUnavailable:
            pass  # the pipeline's outage pause handles an unreachable store
        except UnsafeRedisConfig as exc:
            refuse(exc)

    @app.timer(interval=2.0)
    async def lag_refresh() -> None:  # issue #11: the gauge moves while no batch arrives too
        await update_lag(worker, app)

    @app.task
    async def startup() -> None:
        worker.broker.start()  # issue #12: first, so that an unreachable broker shows at once
        try:
            await worker.emitter.start()
        except Exception as exc:  # noqa: BLE001 - broker away at start: send_all starts it later
            log.warning("producer not started (%s: %s); it is retried with the first emit", type(exc).__name__, exc)
        try:
            await worker.store.server.check_credentials()
            await worker.store.server.wait_until_available()
            redis_cfg = await worker.store.server.check_server(allow_eviction=s.redis_allow_eviction)
            await worker.store.prepare()
            # issue #17: the store's identity against what the group acknowledged; another
            # model's or precision's store refuses the worker (stream/state/epoch.py)
            committed = await group_committed(worker)
            while True:
                try:
                    await worker.store.open_identity(committed, adopt_dtype=s.store_dtype_join == "adopt")
                    break
                except StoreUnavailable as exc:  # gone again since the checks: wait, then retry
                    log.warning("store identity not read (%s); waiting for Redis", exc)
                    await worker.store.server.wait_until_available()
        except UnsafeRedisConfig as exc:
            refuse(exc)
        worker.store_ready = True
        log.info("checkpoint store ok: maxmemory-policy %s, appendonly %s, durability %s",
                 redis_cfg["maxmemory_policy"], "on" if redis_cfg["aof_enabled"] == "1" else "off",
                 s.redis_durability.value)
        log.info("worker %s started: model %s (%s), checkpoint fingerprint %s", s.worker_id,
                 worker.engine.model_name, s.device, worker.engine.fingerprint)

    @app.on_before_shutdown.connect
    async def close_clients(sender: Any, **kwargs: Any) -> None:
        await worker.close_clients()

    worker.api = register_api(app, worker)  # all HTTP, probes and /metrics included: stream/api/ (#9, #21)
    return app


def refuse(exc: BaseException) -> None:
    """One clear line and a distinct exit code (78, EX_CONFIG): a restart loop cannot fix a
    server setting, nor a store written by another model or precision."""
    log.critical("refusing to start: %s", exc)
    logging.shutdown()
    os._exit(78)


async def group_committed(worker: "Worker") -> dict[tuple[str, int], int]:
    """The group's committed offsets on the turns topic, waiting for the broker if need be."""
    s = worker.settings
    delay = 0.5
    while True:
        try:
            return await committed_offsets(s.kafka_bootstrap, s.group_id, s.turns_topic,
                                           client_kwargs=worker.kafka_security.client_kwargs())
        except Exception as exc:  # noqa: BLE001 - the broker away at start: the probe says so; retry
            log.warning("could not read the group's committed offsets (%s: %s); retrying in %.1f s",
                        type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.broker_retry_backoff_max_s)


async def update_lag(worker: "Worker", app: faust.App) -> None:
    """Consumer lag of the partitions this worker owns (stream/kafka/lag.py, issue #11)."""
    topic = worker.settings.turns_topic
    try:
        await worker.lag.refresh(lambda p: app.consumer.highwater(TP(topic, p)),
                                 lambda p: app.consumer.position(TP(topic, p)))
    except Exception:  # noqa: BLE001 - metrics must never break the stream
        log.debug("lag refresh failed", exc_info=True)
