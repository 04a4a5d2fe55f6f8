"""Operator endpoints: `/healthz` (alive), `/readyz` (can serve), `/metrics`; and the
worker's ingestion state, reported by `/health` and the `evostream_ingestion_healthy` gauge.

Why readiness no longer asks about partitions or the broker (issue #18): a worker serves
queries from Redis and its model, whatever the consumer group is doing. Tied to owning
partitions, `/readyz` answered 503 on every member for the seconds a rebalance takes (a second
worker joining, a rolling update), and the Kubernetes Service and compose health checks that
probe it took every pod out of rotation while all of them could answer. Ingestion (owning
partitions, broker reachable, not paused on Redis, no partition stopped on an unreadable
batch) is a different question with its own answer: the gauge (alert on it, scale on lag) and
the `ingestion` detail of `/health`.

Moved here from stream/runtime/worker.py (issue #21) so that all HTTP lives in stream/api/,
with the one error shape of the rest (a `/readyz` 503 is an error body whose `detail` holds the
state behind it).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import Gauge

from stream.api.errors import ApiError
from stream.api.models import IngestionInfo

log = logging.getLogger(__name__)


def ingestion(worker: Any) -> IngestionInfo:
    """The consuming side of `worker` (stream.runtime.worker.Worker) right now."""
    stopped = [p.as_dict() for p in worker.unreadable.stopped()]
    paused = bool(worker.pipeline.paused)
    broker = worker.broker.state.value
    partitions = sorted(worker.lag.assigned) if worker.ready else []
    store, problem = worker.store_status()
    if worker.stopping:
        state = "stopping"
    elif store in ("lost", "building", "full"):
        state = f"store_{store}"  # issue #17: held, waiting for room or for an operator's decision
    elif not worker.broker.reachable:
        state = "broker_unreachable"
    elif paused:
        state = "paused"
    elif stopped:
        state = "partition_stopped"
    elif not worker.ready:
        state = "rebalancing"  # no assignment yet (starting, or a rebalance in progress)
    elif not partitions:
        state = "idle"  # a member with nothing to own (more members than partitions)
    else:
        state = "consuming"
    return IngestionInfo(healthy=state in ("consuming", "idle"), state=state, partitions=partitions, broker=broker,
                         paused=paused, stopped_partitions=stopped, store=store, store_problem=problem)


def install_ingestion_gauge(worker: Any) -> Gauge:
    """`evostream_ingestion_healthy`: 1 while the worker consumes normally, read at scrape."""
    gauge = Gauge("evostream_ingestion_healthy", "1 while this worker owns partitions and consumes them (broker "
                  "reachable, not paused, no partition stopped); readiness (/readyz) does not depend on it",
                  registry=worker.metrics.registry)
    gauge.set_function(lambda: 1.0 if _safe_ingestion(worker) else 0.0)
    return gauge


def _safe_ingestion(worker: Any) -> bool:
    try:
        return ingestion(worker).healthy
    except Exception:  # noqa: BLE001 - a scrape must not fail on a worker still starting
        return False


class OperatorEndpoints:
    """Handlers of `/healthz`, `/readyz`, `/metrics` for one worker."""

    def __init__(self, worker: Any):
        self.worker = worker

    async def healthz(self, request: web.Request) -> web.Response:
        w = self.worker
        return web.json_response({"status": "ok", "worker": w.settings.worker_id, "batches": w.batches})

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when the worker can serve queries: its model is loaded (it is, once HTTP answers),
        Redis was checked at start and answers now, and it is not shutting down."""
        w = self.worker
        store_ok = bool(w.store_ready) and await w.store.server.ping()
        ing = ingestion(w)
        # a lost store, or one still being rebuilt, would answer queries from memories it no
        # longer has (issue #17); a full one still answers reads, so it is said, not refused
        wrong = ing.store in ("lost", "building")
        body: dict[str, Any] = {
            "ready": store_ok and not wrong and not w.stopping,
            "store": ing.store if store_ok else ("unavailable" if w.store_ready else "starting"),
            "stopping": w.stopping,
            # the ingestion side, for people and scripts reading this body (not part of "ready"):
            # the flat keys as before issue #18, and the summary
            "assigned": w.ready, "paused": ing.paused, "broker": ing.broker,
            "stopped_partitions": ing.stopped_partitions, "ingestion": ing.model_dump(),
        }
        if not body["ready"]:
            why = ("shutting down" if w.stopping else "Redis not checked yet" if not w.store_ready
                   else "Redis does not answer" if not store_ok
                   else f"memory-state store {ing.store}: {ing.store_problem or 'see evostream store status'}")
            if wrong and ing.store_problem:
                body["store_problem"] = ing.store_problem
            raise ApiError(503, "not_ready", f"not ready: {why}", {"Retry-After": "1"}, detail=body)
        return web.json_response(body)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.worker.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


__all__ = ["OperatorEndpoints", "ingestion", "install_ingestion_gauge"]
