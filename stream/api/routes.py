"""HTTP handlers (aiohttp, the server faust's web component already runs) for the query API.

Every request goes through the same steps, in this order, so that each status means one
thing: authenticate (401) -> read the body under the size limit (413) -> parse and validate
(422; a text over its size limit 413) -> tenant check (403) -> input count (413) -> find the
memory (404 / 409 / 503) -> token limits (413, or cut with `truncate`) -> the query queue (429)
-> answer. Routes come from one table (stream/api/table.py), which also makes the OpenAPI
document; the error middleware answers every non-2xx, unknown routes and wrong methods
included, in the shape of the route's callers (OpenAI's or TEI's, stream/api/errors.py).
"""

from __future__ import annotations

import asyncio
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
    SHAPES_KEY,
    ApiError,
    error_middleware,
    invalid,
    not_found,
    parse_json,
    too_large,
    unavailable,
    validation_error,
)
from stream.api.health import OperatorEndpoints, ingestion, install_ingestion_gauge
from stream.api.metrics import ApiMetrics
from stream.api.openapi import build_openapi
from stream.api.search import SearchRoute
from stream.api.service import QueryService
from stream.api.table import ROUTES, shapes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _version() -> str:
    try:
        return metadata.version("evostream")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"


def _json_response(payload: Any, status: int = 200) -> web.Response:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return web.Response(status=status, body=body.encode(), content_type="application/json")


def truncate_text(tok: Any, text: str, max_tokens: int, direction: m.TruncationDirection) -> str:
    """`text` cut to at most `max_tokens` tokens of `tok`, keeping its beginning (right) or its
    end (left); cut at token boundaries and re-checked (a cut inside a multi-byte character
    decodes to fewer, different tokens)."""
    ids = tok.encode(text)
    n = max_tokens
    while len(ids) > max_tokens and n > 0:
        kept = ids[:n] if direction is m.TruncationDirection.RIGHT else ids[len(ids) - n:]
        text = tok.decode(kept).strip("\ufffd")
        if len(tok.encode(text)) <= max_tokens:
            return text
        n -= 1
    return text if len(ids) <= max_tokens else ""


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
        self.tok = self.engine.renderer.tok
        self.max_token_id = self.engine.renderer.eot - 1  # ids from eot up are the special tokens
        self.openapi = build_openapi(auth=self.keys.required, version=self.version,
                                     embedding_dim=self.engine.embedding_dim, max_inputs=s.api_max_inputs,
                                     max_token_id=self.max_token_id)
        self.model_name = (self.engine.model_name or "evoembedding")[:256]
        self.operator = OperatorEndpoints(worker)
        self.search_route = SearchRoute(self)  # POST /v1/search through the sink's index (issue #19)
        self.ingestion_gauge = install_ingestion_gauge(worker)

    # -- wiring ------------------------------------------------------------------------------
    def install(self, web_app: web.Application) -> None:
        """Every route of the table (stream/api/table.py), the error middleware, and the
        table's error shapes for it."""
        web_app.middlewares.append(error_middleware)
        web_app[SHAPES_KEY] = shapes()
        owners = {"operator": self.operator, "search": self.search_route}
        for route in ROUTES:
            owner = next((o for tag, o in owners.items() if tag in route.tags), self)
            handler = getattr(owner, route.handler)
            web_app.router.add_route(route.method, route.path, self._timed(route.doc_path, handler))
        web_app.on_shutdown.append(lambda _app: self.batcher.stop())
        web_app.on_shutdown.append(lambda _app: asyncio.to_thread(self.search_route.close))

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

    def _texts(self, inputs: Any, field: str) -> list[str]:
        """The texts of OpenAI's `input` / TEI's `inputs`: a text, texts, one token-id list or
        several. Token ids are decoded with the model's tokenizer (its own encoding of a text
        decodes back to that text); special-token ids are refused."""
        if isinstance(inputs, str):
            return [inputs]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        out = []
        for item in inputs:
            if isinstance(item, str):
                out.append(item)
                continue
            if len(item) > MAX_QUERY_CHARS:
                raise too_large(f"{field}: a token-id input over {MAX_QUERY_CHARS} ids", field)
            if max(item) > self.max_token_id:
                raise invalid(f"invalid request: {field}: token ids above {self.max_token_id} are special tokens or "
                              "outside this model's vocabulary (send the ids POST /tokenize gives for a text)", field)
            out.append(self.tok.decode(item))
        return out

    def _truncate(self, texts: list[str], truncate: bool | None, direction: m.TruncationDirection) -> list[str]:
        if not truncate:
            return texts
        limit = self.settings.api_max_input_tokens - 1  # the end-of-text token counts too
        return [truncate_text(self.tok, t, limit, direction) for t in texts]

    # -- endpoints ---------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        req: m.EmbeddingsRequest = await self._body(request, m.EmbeddingsRequest)
        dim = self.engine.embedding_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise invalid(f"invalid request: dimensions: this model's embeddings have exactly {dim} dimensions "
                          "and cannot be shortened; omit 'dimensions'", "dimensions")
        texts = self._texts(req.input, "input")
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
        texts = self._truncate(self._texts(req.inputs, "inputs"), req.truncate, req.truncation_direction)
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
        texts = self._truncate(list(req.texts), req.truncate, req.truncation_direction)
        query = self._truncate([req.query], req.truncate, req.truncation_direction)[0]
        scores, _tokens = await self.service.rerank(memory, query, texts)
        order = np.argsort(-scores, kind="stable").tolist()
        if req.top_n is not None:
            order = order[: req.top_n]
        # raw_scores: the scores are cosines with no activation on top, so raw = default
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
            model_id=self.model_name, model_sha=s.model_revision, model_dtype=s.dtype,
            model_type=m.ModelTypeInfo(embedding=m.EmbeddingModelInfo(pooling="last_token")),
            max_concurrent_requests=s.query_queue_max, max_input_length=s.api_max_input_tokens,
            max_batch_tokens=s.max_batch_tokens, max_batch_requests=s.query_batch_max,
            max_client_batch_size=s.api_max_inputs, auto_truncate=False,
            tokenization_workers=1,  # requests are tokenised on the worker's event loop
            version=self.version, checkpoint=self.engine.fingerprint, embedding_dim=self.engine.embedding_dim,
            dtype=str(self.engine.state_dtype).removeprefix("torch."),
            device=s.device, auth="required" if self.keys.required else "off",
            limits=m.Limits(max_inputs=s.api_max_inputs, max_input_tokens=s.api_max_input_tokens,
                            max_input_chars=MAX_QUERY_CHARS, max_body_bytes=s.api_max_body_bytes,
                            query_queue_max=s.query_queue_max, query_batch_max=s.query_batch_max)))

    async def health(self, request: web.Request) -> web.Response:
        """200 when the worker can answer queries (its checkpoint store answers a ping, and it is
        neither lost nor being rebuilt: issue #17), with the ingestion side's state as detail
        (stream/api/health.py); a full store is said there (`store_full`), reads still work."""
        if not await self.worker.store.server.ping():
            raise unavailable("checkpoint store unavailable")
        ing = ingestion(self.worker)
        if ing.store in ("lost", "building"):
            raise unavailable(f"memory-state store {ing.store}" + (f": {ing.store_problem}" if ing.store_problem else ""))
        return _json_response(m.HealthResponse(ingestion=ing))

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI's model list: the one model this worker serves."""
        return _json_response(m.ModelList(data=[m.ModelCard(id=self.model_name)]))

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name:
            raise not_found(f"this worker serves one model, {self.model_name!r} (GET /v1/models)", "model_not_found")
        return _json_response(m.ModelCard(id=self.model_name))

    async def tokenize(self, request: web.Request) -> web.Response:
        """TEI's `/tokenize`: each input's tokens with their character offsets, and the
        end-of-text token the model appends (special) when `add_special_tokens`."""
        self._principal(request)
        req: m.TokenizeRequest = await self._body(request, m.TokenizeRequest)
        texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
        self.service.check_count(len(texts))
        eot = self.engine.renderer.eot
        out = []
        for i, text in enumerate(texts):
            toks = [m.SimpleToken(id=t, text=text[a:b], special=False, start=a, stop=b)
                    for t, a, b in self.tok.encode_offsets(text)]
            if len(toks) + 1 > self.settings.api_max_input_tokens:
                raise too_large(f"input {i} has {len(toks) + 1} tokens; the limit is "
                                f"{self.settings.api_max_input_tokens} (api_max_input_tokens)", "inputs")
            if req.add_special_tokens:
                toks.append(m.SimpleToken(id=eot, text=self.tok.decode([eot]), special=True, start=None, stop=None))
            out.append([t.model_dump() for t in toks])
        return _json_response(out)

    async def openapi_doc(self, request: web.Request) -> web.Response:
        return _json_response(self.openapi)
