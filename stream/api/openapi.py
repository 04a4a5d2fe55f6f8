"""The OpenAPI 3.1 document, generated from the route table (stream/api/table.py) and the
pydantic models the server validates with: a route added to the table appears here with its
request, answer and error statuses, and a field added to a model appears in its schema (issue
#21: the path table used to be written a second time by hand here).

Every operation lists every status it can answer; each non-2xx carries the error body of its
route's shape (OpenAI's or TEI's, stream/api/errors.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from stream.api import models as m
from stream.api.errors import ErrorShape
from stream.api.table import ROUTES, Route

_REF = "#/components/schemas/{model}"

_ERRORS = {
    "401": "missing or unknown API key",
    "403": "the API key may not read that tenant",
    "404": "unknown conversation (send unknown_conversation='memoryless' to embed without memory), or unknown model",
    "409": "the conversation's checkpoint belongs to another model or is unreadable",
    "413": "body, input count or input length over the limits in GET /info",
    "422": "invalid request",
    "429": "query queue full; retry later",
    "500": "internal error",
    "503": "checkpoint store unavailable (or, for /readyz, the worker cannot serve)",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=model.__name__)}


def _error_body(shape: ErrorShape) -> dict[str, Any]:
    return _ref(m.OpenAIErrorBody if shape is ErrorShape.OPENAI else m.ErrorBody)


def _ok(route: Route) -> dict[str, Any]:
    r = route.response
    if isinstance(r, type) and issubclass(r, BaseModel):
        return {"description": "OK", "content": _json(_ref(r))}
    kind = r[0]
    if kind == "list":
        return {"description": "OK", "content": _json({"type": "array", "items": _ref(r[1])})}
    if kind == "vectors":
        return {"description": "OK", "content": _json(TypeAdapter(list[list[float]]).json_schema())}
    if kind == "tokens":
        return {"description": "OK", "content": _json({"type": "array", "items": {"type": "array",
                                                                                    "items": _ref(m.SimpleToken)}})}
    if kind == "text":
        return {"description": "OK", "content": {r[1].split(";")[0]: {"schema": {"type": "string"}}}}
    return {"description": "OK", "content": _json({"type": "object"})}


def _operation(route: Route, *, auth: bool) -> dict[str, Any]:
    codes = [c for c in route.errors if c != "401" or auth]
    op: dict[str, Any] = {
        "operationId": route.op_id,
        "summary": route.summary,
        "tags": list(route.tags),
        "responses": {"200": _ok(route), **{c: {"description": _ERRORS[c], "content": _json(_error_body(route.shape))}
                                            for c in codes}},
    }
    if route.request is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(route.request))}
    if route.path_params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                            for p in route.path_params]
    if route.auth and auth:
        op["security"] = [{"bearer": []}]
    if route.deprecated:
        op["deprecated"] = True
    return op


def _limit_items(schema: dict[str, Any], max_items: int, max_token_id: int) -> None:
    """Runtime limits the model classes cannot state: the configured input count on every
    array of inputs, the highest plain-text token id on every token id."""
    if schema.get("type") == "array" and schema.get("items", {}).get("type") in ("string", "array"):
        schema["maxItems"] = max_items
    if schema.get("type") == "integer" and schema.get("minimum") == 0:
        schema["maximum"] = max_token_id
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _limit_items(sub, max_items, max_token_id)
    if isinstance(schema.get("items"), dict):
        _limit_items(schema["items"], max_items, max_token_id)


def build_openapi(*, auth: bool, version: str, embedding_dim: int, max_inputs: int,
                  max_token_id: int) -> dict[str, Any]:
    models: list[type[BaseModel]] = []
    for r in ROUTES:
        if r.request is not None:
            models.append(r.request)
    responses = {m.OpenAIErrorBody, m.ErrorBody, m.SimpleToken}
    for r in ROUTES:
        if isinstance(r.response, type):
            responses.add(r.response)
        elif r.response and r.response[0] == "list":
            responses.add(r.response[1])
    _, defs = models_json_schema([(x, "validation") for x in models]
                                 + [(x, "serialization") for x in sorted(responses, key=lambda c: c.__name__)],
                                 ref_template=_REF)
    schemas = defs.get("$defs", {})
    for name, prop in (("EmbeddingsRequest", "input"), ("EmbedRequest", "inputs"), ("RerankRequest", "texts"),
                       ("TokenizeRequest", "inputs")):
        _limit_items(schemas[name]["properties"][prop], max_inputs, max_token_id)
    # `dimensions` is only accepted when it is the model's own (a runtime value the model
    # class cannot state): say so in the document, so generated clients know it.
    schemas["EmbeddingsRequest"]["properties"]["dimensions"] = {
        "anyOf": [{"const": embedding_dim, "type": "integer"}, {"type": "null"}], "default": None,
        "description": f"only {embedding_dim} (the model's dimension) is accepted; vectors cannot be shortened"}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.doc_path, {})[r.method.lower()] = _operation(r, auth=auth)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "evostream query API", "version": version,
                 "description": "OpenAI- and TEI-compatible embeddings against a conversation's live "
                                "EvoEmbedding memory. Errors: OpenAI's {error: {message, type, param, code}} on "
                                "/v1/embeddings and /v1/models, TEI's {error, error_type} elsewhere."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
