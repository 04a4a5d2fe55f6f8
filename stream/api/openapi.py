"""The OpenAPI 3.1 document, generated from the pydantic models the server validates with (so
a field added to a model appears here, and a client generated from it sends what the server
accepts). Every operation lists every status it can answer, each non-2xx with ErrorBody."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from stream.api import models as m

_REF = "#/components/schemas/{model}"

_ERRORS = {
    "401": "missing or unknown API key",
    "403": "the API key may not read that tenant",
    "404": "unknown conversation (send unknown_conversation='memoryless' to embed without memory)",
    "409": "the conversation's checkpoint belongs to another model or is unreadable",
    "413": "body, input count or input length over the limits in GET /info",
    "422": "invalid request",
    "429": "query queue full; retry later",
    "500": "internal error",
    "503": "checkpoint store unavailable",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=model.__name__)}


def _errors(codes: list[str]) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": _json(_ref(m.ErrorBody))} for c in codes}


def _post(summary: str, req: type[BaseModel], ok: dict[str, Any], *, auth: bool, memory: bool = True,
          op_id: str) -> dict[str, Any]:
    codes = (["401", "403"] if auth else ["403"]) + (["404", "409"] if memory else []) + [
        "413", "422", "429", "500", "503"]
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "requestBody": {"required": True, "content": _json(_ref(req))},
        "responses": {"200": {"description": "OK", "content": _json(ok)}, **_errors(codes)},
    }
    if auth:
        op["security"] = [{"bearer": []}]
    return {"post": op}


def _get(summary: str, ok: dict[str, Any], op_id: str, extra: list[str] = ()) -> dict[str, Any]:
    return {"get": {"operationId": op_id, "summary": summary,
                    "responses": {"200": {"description": "OK", "content": _json(ok)}, **_errors(["500", *extra])}}}


def _limit_items(schema: dict[str, Any], max_items: int) -> None:
    """Put the configured input-count limit into every array of texts (runtime settings the
    model classes cannot state)."""
    if schema.get("type") == "array" and schema.get("items", {}).get("type") == "string":
        schema["maxItems"] = max_items
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _limit_items(sub, max_items)


def build_openapi(*, auth: bool, version: str, embedding_dim: int, max_inputs: int) -> dict[str, Any]:
    requests = [m.EmbeddingsRequest, m.EmbedRequest, m.RerankRequest, m.QueryRequest]
    responses = [m.EmbeddingsResponse, m.RerankHit, m.InfoResponse, m.HealthResponse, m.ErrorBody, m.QueryResponse]
    _, defs = models_json_schema([(x, "validation") for x in requests] + [(x, "serialization") for x in responses],
                                 ref_template=_REF)
    schemas = defs.get("$defs", {})
    # `dimensions` is only accepted when it is the model's own (a runtime value the model
    # class cannot state): say so in the document, so generated clients know it.
    for name, prop in (("EmbeddingsRequest", "input"), ("EmbedRequest", "inputs"), ("RerankRequest", "texts")):
        _limit_items(schemas[name]["properties"][prop], max_inputs)
    schemas["EmbeddingsRequest"]["properties"]["dimensions"] = {
        "anyOf": [{"const": embedding_dim, "type": "integer"}, {"type": "null"}], "default": None,
        "description": f"only {embedding_dim} (the model's dimension) is accepted; vectors cannot be shortened"}
    vectors = TypeAdapter(list[list[float]]).json_schema()
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "evostream query API", "version": version,
                 "description": "OpenAI- and TEI-compatible embeddings against a conversation's live "
                                "EvoEmbedding memory. Errors: {error, error_type}."},
        "paths": {
            "/v1/embeddings": _post("OpenAI-compatible embeddings", m.EmbeddingsRequest, _ref(m.EmbeddingsResponse),
                                    auth=auth, op_id="createEmbeddings"),
            "/embed": _post("TEI-style embeddings", m.EmbedRequest, vectors, auth=auth, op_id="embed"),
            "/rerank": _post("TEI-style rerank (reference client semantics)", m.RerankRequest,
                             {"type": "array", "items": _ref(m.RerankHit)}, auth=auth, op_id="rerank"),
            "/v1/query": _post("one query against one conversation (deprecated: use /v1/embeddings)",
                               m.QueryRequest, _ref(m.QueryResponse), auth=auth, op_id="query"),
            "/info": _get("model, checkpoint, limits", _ref(m.InfoResponse), "info"),
            "/health": _get("the worker can answer queries", _ref(m.HealthResponse), "health", ["503"]),
        },
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
