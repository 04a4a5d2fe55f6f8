"""HTTP handlers (aiohttp, the server faust's web component already runs) for the query API.

Every request goes through the same steps, in this order, so that each status means one
thing: authenticate (401) -> read the body under the size limit (413) -> parse and validate
(422) -> tenant check (403) -> input count (413) -> find the memory (404 / 409 / 503) -> token
limits (413) -> the query queue (429) -> answer. Handlers are plain aiohttp coroutines
registered on faust's aiohttp application; the error middleware gives every non-2xx, unknown
routes and wrong methods included, the `{"error", "error_type"}` shape.
"""

from __future__ import annotations

import base64
import json
import time
from importlib import metadata
from typing import Any, Awaitable, Callable

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError

from schemas.events import MAX_QUERY_CHARS, QueryResponse
from schemas.vectors import encode_vector
from stream.api import models as m
from stream.api.auth import KeyTable, Principal
from stream.api.batcher import QueryBatcher
from stream.api.errors import (
    ApiError,
    error_middleware,
    invalid,
    parse_json,
    too_large,
    unavailable,
    validation_error,
)
from stream.api.metrics import ApiMetrics
from stream.api.openapi import build_openapi
from stream.api.service import QueryService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _version() -> str:
    try:
        return metadata.version("evostream")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"


def _json_response(payload: Any, status: int = 200) -> web.Response:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return web.Response(status=status, body=body.encode(), content_type="application/json")


class QueryApi:
    """The query endpoints of one worker. `worker` provides engine, store, pipeline (its state
    cache), settings, metrics and the model thread (`executor`, a ModelThread)."""

    def __init__(self, worker: Any):
        s = worker.settings
        self.worker = worker
        self.engine = worker.engine
        self.settings = s
        self.keys = KeyTable.from_settings(s)
        self.metrics = ApiMetrics(worker.metrics.registry)
        self.batcher = QueryBatcher(
            self.engine, worker.executor, queue_max=s.query_queue_max, batch_max=s.query_batch_max,
            batch_wait_s=s.query_batch_wait_ms / 1000, share=s.query_share, grace_s=s.query_idle_grace_ms / 1000,
            metrics=self.metrics)
        self.service = QueryService(self.engine, worker.store, worker.pipeline.cache, self.batcher,
                                    max_inputs=s.api_max_inputs, max_input_tokens=s.api_max_input_tokens)
        self.version = _version()
        self.openapi = build_openapi(auth=self.keys.required, version=self.version,
                                     embedding_dim=self.engine.embedding_dim, max_inputs=s.api_max_inputs)
        self.model_name = (self.engine.model_name or "evoembedding")[:256]

    # -- wiring ------------------------------------------------------------------------------
    def install(self, web_app: web.Application) -> None:
        web_app.middlewares.append(error_middleware)
        routes = [("POST", "/v1/embeddings", self.embeddings), ("POST", "/embed", self.embed),
                  ("POST", "/rerank", self.rerank), ("POST", "/v1/query", self.query),
                  ("GET", "/info", self.info), ("GET", "/health", self.health),
                  ("GET", "/openapi.json", self.openapi_doc)]
        for method, path, handler in routes:
            web_app.router.add_route(method, path, self._timed(path, handler))
        from stream.api.search import SearchRoute  # issue #19: POST /v1/search through the index

        SearchRoute(self).install(web_app)
        web_app.on_shutdown.append(lambda _app: self.batcher.stop())

    def _timed(self, name: str, handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except ApiError as exc:
                status = exc.status
                raise
            finally:
                self.metrics.requests.labels(endpoint=name, status=str(status)).inc()
                self.metrics.request_s.labels(endpoint=name).observe(time.perf_counter() - t0)

        return run

    # -- common steps ------------------------------------------------------------------------
    def _principal(self, request: web.Request) -> Principal:
        return self.keys.authenticate(request.headers.get("Authorization"))

    async def _body(self, request: web.Request, model: type[m.BaseModel]) -> Any:
        limit = self.settings.api_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(f"request body over {limit} bytes (api_max_body_bytes)")
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise too_large(f"request body over {limit} bytes (api_max_body_bytes)")
            chunks.append(chunk)
        data = parse_json(b"".join(chunks))
        if not isinstance(data, dict):
            raise invalid("invalid request: the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None

    # -- endpoints ---------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        req: m.EmbeddingsRequest = await self._body(request, m.EmbeddingsRequest)
        dim = self.engine.embedding_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise invalid(f"invalid request: dimensions: this model's embeddings have exactly {dim} dimensions "
                          "and cannot be shortened; omit 'dimensions'")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        self.service.check_count(len(texts))
        memory = await self.service.memory(principal, req.conversation_id, req.tenant, req.unknown_conversation)
        prepared = self.service.prepare(texts, req.input_type, memory.state)
        vecs = await self.service.embed(prepared)
        data = []
        for i, v in enumerate(vecs):
            v = np.asarray(v, dtype="<f4")
            emb: list[float] | str = (base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64"
                                      else v.astype(float).tolist())
            data.append(m.EmbeddingData(index=i, embedding=emb))
        self.worker.metrics.queries.inc(len(texts))
        return _json_response(m.EmbeddingsResponse(
            data=data, model=self.model_name, usage=m.Usage(prompt_tokens=prepared.tokens, total_tokens=prepared.tokens),
            checkpoint=self.engine.fingerprint, memory=memory.info))

    async def embed(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        req: m.EmbedRequest = await self._body(request, m.EmbedRequest)
        texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
        self.service.check_count(len(texts))
        memory = await self.service.memory(principal, req.conversation_id, req.tenant, req.unknown_conversation)
        prepared = self.service.prepare(texts, req.input_type, memory.state)
        vecs = await self.service.embed(prepared)
        self.worker.metrics.queries.inc(len(texts))
        return _json_response(np.asarray(vecs, dtype=np.float32).astype(float).tolist())

    async def rerank(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        req: m.RerankRequest = await self._body(request, m.RerankRequest)
        self.service.check_count(len(req.texts))
        memory = await self.service.memory(principal, req.conversation_id, req.tenant, req.unknown_conversation)
        scores, _tokens = await self.service.rerank(memory, req.query, list(req.texts))
        order = np.argsort(-scores, kind="stable").tolist()
        if req.top_n is not None:
            order = order[: req.top_n]
        hits = [m.RerankHit(index=i, score=float(scores[i]), text=req.texts[i] if req.return_text else None)
                for i in order]
        self.worker.metrics.queries.inc()
        return _json_response([h.model_dump(exclude_none=True) for h in hits])

    async def query(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        req: m.QueryRequest = await self._body(request, m.QueryRequest)
        memory = await self.service.memory(principal, req.conversation_id, req.tenant, req.unknown_conversation)
        prepared = self.service.prepare([req.query], m.InputType.QUERY, memory.state)
        vec = (await self.service.embed(prepared))[0]
        info = memory.info
        assert info is not None  # a conversation is required here
        self.worker.metrics.queries.inc()
        return _json_response(QueryResponse(
            conversation_id=req.conversation_id, vector=encode_vector(np.asarray(vec, dtype=np.float32)),
            dim=int(vec.shape[0]), memory_len=info.memory_len, applied_seq=info.applied_seq,
            checkpoint=self.engine.fingerprint, model=self.model_name))

    async def info(self, request: web.Request) -> web.Response:
        s = self.settings
        return _json_response(m.InfoResponse(
            model_id=self.model_name, checkpoint=self.engine.fingerprint, embedding_dim=self.engine.embedding_dim,
            max_input_length=s.api_max_input_tokens, dtype=str(self.engine.state_dtype).removeprefix("torch."),
            device=s.device, version=self.version, auth="required" if self.keys.required else "off",
            limits=m.Limits(max_inputs=s.api_max_inputs, max_input_tokens=s.api_max_input_tokens,
                            max_input_chars=MAX_QUERY_CHARS, max_body_bytes=s.api_max_body_bytes,
                            query_queue_max=s.query_queue_max, query_batch_max=s.query_batch_max)))

    async def health(self, request: web.Request) -> web.Response:
        """200 when the worker can answer queries: its checkpoint store answers a ping, and
        (issue #17) it is neither lost (answers would use missing memories) nor full."""
        if not await self.worker.store.server.ping():
            raise unavailable("checkpoint store unavailable")
        state, why = getattr(self.worker, "store_status", lambda: ("ok", None))()
        if state in ("lost", "building", "full"):
            raise unavailable(f"memory-state store {state}" + (f": {why}" if why else ""))
        return _json_response(m.HealthResponse())

    async def openapi_doc(self, request: web.Request) -> web.Response:
        return _json_response(self.openapi)
