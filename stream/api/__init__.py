"""All of the worker's HTTP: the query API (OpenAI `POST /v1/embeddings`, `GET /v1/models`;
TEI-style `POST /embed`, `/rerank`, `/tokenize`, `GET /info`, `/health`; `GET /openapi.json`;
the older `POST /v1/query`) and the operator probes (`/healthz`, `/readyz`, `/metrics`); API
keys bound to tenants; each route's errors in its callers' shape; a bounded, micro-batched
query queue that takes turns with ingestion on the model thread.

Modules: `table` (the routes, declared once), `models` (bodies), `errors` (the two error
shapes), `auth` (keys -> tenants), `batcher` (queue + fairness), `service` (memory lookup,
texts), `routes` (handlers), `health` (probes, the ingestion signal), `openapi` (the document,
from the table), `metrics`.

May import: stream.settings, stream.state, stream.identity, stream.runtime (model thread),
schemas, workers. Never devtools.
"""

from __future__ import annotations

from typing import Any


def register_api(app: Any, worker: Any) -> Any:
    """Install every route (stream/api/table.py) on a faust app's aiohttp application;
    returns the QueryApi."""
    from stream.api.routes import QueryApi

    api = QueryApi(worker)
    api.install(app.web.web_app)
    return api


__all__ = ["register_api"]
