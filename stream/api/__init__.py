"""The worker's HTTP query API: OpenAI `POST /v1/embeddings`, TEI-style `POST /embed`,
`POST /rerank`, `GET /info`, `GET /health`, `GET /openapi.json`, `POST /v1/search` (issue #19:
ranked through the sink's index), and the older `POST /v1/query`; API keys bound to tenants; one error shape; a bounded, micro-batched query
queue that takes turns with ingestion on the model thread.

Modules: `models` (bodies), `errors` (the error shape), `auth` (keys -> tenants), `batcher`
(queue + fairness), `service` (memory lookup, texts), `routes` (aiohttp handlers),
`openapi` (the document), `metrics`, `search` (`POST /v1/search`).

May import: the stream root modules, schemas, workers, state, index (the search route reads the
sink's index), and the runtime's leaf module `model_thread`. The worker hands itself to `register_api`; the API never imports it.
"""

from __future__ import annotations

from typing import Any


def register_api(app: Any, worker: Any) -> Any:
    """Install the API on a faust app's aiohttp application; returns the QueryApi."""
    from stream.api.routes import QueryApi

    api = QueryApi(worker)
    api.install(app.web.web_app)
    return api


__all__ = ["register_api"]
