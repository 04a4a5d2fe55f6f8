
"""All of the worker's HTTP: the query API (OpenAI `POST /v1/embeddings`, `GET /v1/models`;
TEI-style `POST /embed`, `/rerank`, `/tokenize`, `GET /info`, `/health`; `GET /openapi.json`;
`POST /v1/search` (issue #19: ranked through the sink's index); the older `POST /v1/query`) and
the operator probes (`/healthz`, `/readyz`, `/metrics`); API keys bound to tenants; each route's
errors in its callers' shape; a bounded, micro-batched query queue that takes turns with
ingestion on the model thread.

Modules: `table` (the routes, declared once), `models` (bodies), `errors` (the two error
shapes), `auth` (keys -> tenants), `batcher` (queue + fairness), `service` (memory lookup,
texts), `routes` (handlers), `health` (probes, the ingestion signal), `search`
(`POST /v1/search`), `openapi` (the document, from the table), `metrics`.

May import: the stream root modules, schemas, workers, state, index (the search route reads the
sink's index), and the runtime's leaf module `model_thread`. The worker hands itself to
`register_api`; the API never imports it. Never devtools.
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
