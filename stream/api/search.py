"""`POST /v1/search` (issue #19): embed the query against a conversation's live memory (or
memory-less), then rank the tenant's turns through the index the sink keeps.

Scoping: the tenant is resolved and checked exactly as for the other endpoints (the API key's
tenants); the index is only ever asked about that tenant. `scope` says what is ranked: the
conversation's own turns (the default when a conversation is named: an exact scan) or every
conversation of the tenant (the HNSW index). Only vectors of this worker's checkpoint are
compared. The index connection (sink_search_dsn, else sink_dsn, else the SQLite file) is
opened on the first search and reopened after a failure; a database that does not answer is a
503, a worker without a configured PostgreSQL that finds no SQLite index answers with no hits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Literal

from aiohttp import web
from pydantic import AwareDatetime, Field

from stream.api import models as m
from stream.api.errors import invalid, unavailable

log = logging.getLogger(__name__)


class SearchRequest(m._Body):
    """Body of `POST /v1/search`."""

    query: m.InputText = Field(min_length=1, description="the query text")
    conversation_id: m.ConversationIdField | None = None
    tenant: m.TenantField | None = None
    scope: Literal["conversation", "tenant"] | None = Field(
        None, description="rank the conversation's turns or the whole tenant's; default: conversation when one is "
                          "named, else tenant")
    since: AwareDatetime | None = Field(None, description="only turns at or after this time")
    until: AwareDatetime | None = Field(None, description="only turns before this time")
    k: int = Field(5, ge=1, le=100)
    exact: bool = Field(False, description="exact scan instead of the approximate (HNSW) index")


class SearchHitBody(m._Body):
    conversation_id: str
    generation: int
    seq: int
    document_id: str
    score: float
    turn_at: AwareDatetime
    text: str | None = None


class SearchResponse(m._Body):
    hits: list[SearchHitBody]
    checkpoint: str
    index: str = Field(description="postgres or sqlite")
    memory: m.MemoryInfo | None = None


class SearchRoute:
    def __init__(self, api: Any):
        self.api = api
        self._index: Any = None
        self._lock = threading.Lock()   # one connection: searches take turns on it

    def install(self, web_app: web.Application) -> None:
        web_app.router.add_route("POST", "/v1/search", self.api._timed("/v1/search", self.search))
        web_app.on_shutdown.append(lambda _app: asyncio.to_thread(self.close))

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None

    def _search(self, q: Any) -> tuple[list[Any], str]:
        from stream.index.sink import open_index
        from workers.tokenizer import cache_dir

        with self._lock:
            if self._index is None:
                self._index = open_index(self.api.settings, for_search=True, cache_root=cache_dir())
            try:
                return self._index.search(q), self._index.kind
            except ValueError:
                raise
            except Exception:
                self._index.close()  # reopened by the next search
                self._index = None
                raise

    async def search(self, request: web.Request) -> web.Response:
        from stream.api.routes import _json_response
        from stream.index.base import SearchQuery

        api = self.api
        principal = api._principal(request)
        req: SearchRequest = await api._body(request, SearchRequest)
        scope = req.scope or ("conversation" if req.conversation_id is not None else "tenant")
        if scope == "conversation" and req.conversation_id is None:
            raise invalid("invalid request: scope 'conversation' needs a conversation_id")
        memory = await api.service.memory(principal, req.conversation_id, req.tenant, m.UnknownConversation.MEMORYLESS)
        prepared = api.service.prepare([req.query], m.InputType.QUERY, memory.state)
        vec = (await api.service.embed(prepared))[0]
        tenant = principal.resolve_tenant(req.tenant)
        q = SearchQuery(vector=vec, checkpoint=api.engine.fingerprint, tenant=tenant,
                        conversation_id=req.conversation_id if scope == "conversation" else None,
                        since=req.since, until=req.until, k=req.k, exact=req.exact)
        try:
            hits, kind = await asyncio.to_thread(self._search, q)
        except ValueError as exc:  # a query of another dimension than the index (another model)
            raise invalid(f"invalid request: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the index is away: say so, do not crash
            log.warning("search: index unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            raise unavailable("the search index is unavailable; retry later") from None
        api.worker.metrics.queries.inc()
        return _json_response(SearchResponse(
            hits=[SearchHitBody(**h.model_dump()) for h in hits], checkpoint=api.engine.fingerprint, index=kind,
            memory=memory.info))


__all__ = ["SearchRequest", "SearchResponse", "SearchRoute"]
