"""The worker's HTTP routes, declared once (issue #21).

Both the server (`QueryApi.install` registers each route's handler) and the OpenAPI document
(`stream/api/openapi.py`) are made from this table, so a route cannot be served without being
documented, or documented without being served. Each entry says which error shape its callers
read (`ErrorShape`: OpenAI's nested body or TEI's flat one), what it takes and answers, whether
it needs an API key, and which error statuses it can give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from stream.api import models as m
from stream.api.errors import ErrorShape
from stream.api.search import SearchRequest, SearchResponse

#: The statuses every POST route over a conversation's memory can answer, in step order
#: (stream/api/routes.py): key, tenant, memory, size, body, queue, store.
MEMORY_ERRORS = ("401", "403", "404", "409", "413", "422", "429", "500", "503")


@dataclass(frozen=True)
class Route:
    method: str
    path: str                  # aiohttp template; `{name:regex}` parameters allowed
    handler: str               # attribute of the handlers object (QueryApi) that answers it
    op_id: str
    summary: str
    shape: ErrorShape = ErrorShape.TEI
    request: type[BaseModel] | None = None
    response: Any = None       # a model, ("list", model), ("vectors",), ("tokens",) or ("text", content type)
    auth: bool = False         # needs an API key when authentication is on
    errors: tuple[str, ...] = ("500",)
    deprecated: bool = False
    tags: tuple[str, ...] = field(default=())

    @property
    def doc_path(self) -> str:
        """The OpenAPI path: `{name:regex}` written `{name}`."""
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", self.path)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"\{(\w+)", self.path)


OPENAI, TEI = ErrorShape.OPENAI, ErrorShape.TEI

ROUTES: tuple[Route, ...] = (
    # -- OpenAI ------------------------------------------------------------------------------
    Route("POST", "/v1/embeddings", "embeddings", "createEmbeddings", "OpenAI-compatible embeddings", OPENAI,
          m.EmbeddingsRequest, m.EmbeddingsResponse, auth=True, errors=MEMORY_ERRORS, tags=("openai",)),
    Route("GET", "/v1/models", "models", "listModels", "the worker's one model (OpenAI shape)", OPENAI,
          response=m.ModelList, tags=("openai",)),
    Route("GET", "/v1/models/{model:.+}", "model", "retrieveModel", "one model by id (OpenAI shape)", OPENAI,
          response=m.ModelCard, errors=("404", "500"), tags=("openai",)),
    # -- TEI ---------------------------------------------------------------------------------
    Route("POST", "/embed", "embed", "embed", "TEI-style embeddings", TEI, m.EmbedRequest, ("vectors",),
          auth=True, errors=MEMORY_ERRORS, tags=("tei",)),
    Route("POST", "/rerank", "rerank", "rerank", "TEI-style rerank (reference client semantics)", TEI,
          m.RerankRequest, ("list", m.RerankHit), auth=True, errors=MEMORY_ERRORS, tags=("tei",)),
    Route("POST", "/tokenize", "tokenize", "tokenize", "TEI-style tokenize: the tokens the model reads", TEI,
          m.TokenizeRequest, ("tokens",), auth=True, errors=("401", "413", "422", "500"), tags=("tei",)),
    Route("GET", "/info", "info", "info", "model, checkpoint, limits (TEI's fields and more)", TEI,
          response=m.InfoResponse, tags=("tei",)),
    Route("GET", "/health", "health", "health", "the worker can answer queries; ingestion's state as detail", TEI,
          response=m.HealthResponse, errors=("500", "503"), tags=("tei",)),
    # -- evostream ---------------------------------------------------------------------------
    Route("POST", "/v1/query", "query", "query", "one query against one conversation (deprecated: use "
          "/v1/embeddings)", TEI, m.QueryRequest, m.QueryResponse, auth=True,
          errors=("401", "403", "404", "409", "413", "422", "429", "500", "503"), deprecated=True,
          tags=("evostream",)),
    Route("POST", "/v1/search", "search", "search", "rank a tenant's or a conversation's turns through the sink's "
          "index, the query embedded against the conversation's live memory (issue #19)", TEI, SearchRequest,
          SearchResponse, auth=True, errors=("401", "403", "409", "413", "422", "429", "500", "503"),
          tags=("evostream", "search")),
    Route("GET", "/openapi.json", "openapi_doc", "openapi", "this document", TEI, response=("object",),
          tags=("evostream",)),
    # -- operator probes (stream/api/health.py) ----------------------------------------------
    Route("GET", "/healthz", "healthz", "healthz", "liveness: the process answers", TEI,
          response=("object",), tags=("operator",)),
    Route("GET", "/readyz", "readyz", "readyz", "readiness: the worker can serve queries (model loaded, Redis "
          "answers, not stopping); ingestion is not part of it (see /health)", TEI, response=("object",),
          errors=("500", "503"), tags=("operator",)),
    Route("GET", "/metrics", "prometheus", "metrics", "Prometheus metrics", TEI,
          response=("text", "text/plain; version=0.0.4"), tags=("operator",)),
)


def shapes() -> dict[str, ErrorShape]:
    """{aiohttp path template: error shape} of every route (for the error middleware)."""
    return {r.doc_path: r.shape for r in ROUTES}  # aiohttp's `canonical` of a template is its doc form


__all__ = ["MEMORY_ERRORS", "ROUTES", "Route", "shapes"]
