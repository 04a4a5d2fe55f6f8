"""What `/readyz`, `/health`'s ingestion and the ingestion gauge say for each state of the
memory-state store (issues #17 and #18), on our own logic alone: a stand-in worker carries
exactly the attributes stream/api/health.py reads. The process-level versions (a real Redis
emptied or filled under a running worker) are tests/test_store_loss.py (slow) and the chaos
scenario `store_flushall` (default run)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from stream.api.errors import ApiError
from stream.api.health import OperatorEndpoints, ingestion


def _worker(store: str = "ok", problem: str | None = None, *, paused: bool = False) -> SimpleNamespace:
    async def ping() -> bool:
        return True

    return SimpleNamespace(
        unreadable=SimpleNamespace(stopped=lambda: []),
        pipeline=SimpleNamespace(paused=paused),
        broker=SimpleNamespace(state=SimpleNamespace(value="connected"), reachable=True),
        lag=SimpleNamespace(assigned={0, 1}), ready=True, stopping=False, store_ready=True,
        store=SimpleNamespace(server=SimpleNamespace(ping=ping)),
        store_status=lambda: (store, problem))


def _readyz(w: SimpleNamespace) -> tuple[int, dict]:
    try:
        resp = asyncio.run(OperatorEndpoints(w).readyz(None))
    except ApiError as exc:
        return exc.status, exc.detail or {}
    import json

    return resp.status, json.loads(resp.body)


def test_a_healthy_worker_consumes_and_is_ready() -> None:
    ing = ingestion(_worker())
    assert ing.healthy and ing.state == "consuming" and ing.store == "ok"
    code, body = _readyz(_worker())
    assert code == 200 and body["ready"] and body["store"] == "ok"


@pytest.mark.parametrize("store", ["lost", "building"])
def test_a_lost_or_rebuilding_store_fails_readiness_and_says_why(store: str) -> None:
    w = _worker(store, "the store identity is gone (emptied or replaced)")
    ing = ingestion(w)
    assert not ing.healthy and ing.state == f"store_{store}" and ing.store_problem
    code, body = _readyz(w)
    assert code == 503 and not body["ready"] and body["store"] == store
    assert body["store_problem"] == "the store identity is gone (emptied or replaced)"


def test_a_full_store_stops_ingestion_but_not_serving() -> None:
    """Reads still work on a full Redis, and every pod shares it: readiness stays 200 (a 503
    would empty the whole Service at once); ingestion says `store_full`."""
    w = _worker("full", paused=True)
    ing = ingestion(w)
    assert not ing.healthy and ing.state == "store_full" and ing.store == "full"
    code, body = _readyz(w)
    assert code == 200 and body["ready"] and body["store"] == "full"
    assert body["ingestion"]["state"] == "store_full"


def test_redis_unreachable_is_a_pause_not_a_store_state() -> None:
    ing = ingestion(_worker("unavailable", paused=True))
    assert not ing.healthy and ing.state == "paused"
