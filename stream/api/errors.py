"""Every non-2xx answer in the shape its caller's client library reads (issue #18):

* OpenAI routes (`/v1/embeddings`, `/v1/models`, any unknown `/v1/...` path):
  `{"error": {"message", "type", "param", "code"}}` -- the `openai` client shows the message
  and fills `e.type`, `e.code`, `e.param` from it (with a flat body it showed only the status);
* every other route (TEI-style, evostream's own, the operator probes): TEI's
  `{"error": <message>, "error_type": <type>}`.

`code` (OpenAI) and `error_type` (TEI) are the same word for the same failure, so one table
in the README lists them all. Why messages never contain input: request
bodies carry conversation text, and error bodies end up in logs and dashboards that must not
hold it. Validation errors are therefore described by *where* (the field path, which names
only fields of our own models) and *what* (pydantic's message, which does not quote the
value), never by the offending value; an unknown field is reported without its name.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from stream.api.models import ErrorBody, OpenAIError, OpenAIErrorBody

_MAX_ERRORS = 5


class ErrorShape(StrEnum):
    """Which client library a route's callers use, and so which error body they can read."""

    OPENAI = "openai"
    TEI = "tei"


#: the key under which the route table's {path template: shape} lives on the aiohttp app
SHAPES_KEY: web.AppKey[dict[str, ErrorShape]] = web.AppKey("evostream_error_shapes", dict)


class ApiError(Exception):
    """Raised anywhere under a handler; the middleware renders it. `param` names the request
    field at fault (OpenAI's `param`), when there is one."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None,
                 *, param: str | None = None, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}
        self.param = param
        self.detail = detail


def openai_type(status: int) -> str:
    """OpenAI's error `type` for a status (the categories its own API answers with)."""
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None, *,
                   shape: ErrorShape = ErrorShape.TEI, param: str | None = None,
                   detail: dict[str, Any] | None = None) -> web.Response:
    if shape is ErrorShape.OPENAI:
        body = OpenAIErrorBody(error=OpenAIError(message=message, type=openai_type(status), param=param,
                                                 code=error_type)).model_dump_json()
    else:
        body = ErrorBody(error=message, error_type=error_type, detail=detail).model_dump_json(exclude_none=True)
    return web.Response(status=status, body=body.encode(), content_type="application/json", headers=headers)


def shape_of(request: web.Request) -> ErrorShape:
    """The error shape for a request: its route's (from the route table), else by prefix (an
    unknown `/v1/...` path is an OpenAI client's typo)."""
    shapes = request.app.get(SHAPES_KEY, {})
    route = request.match_info.route
    template = getattr(route.resource, "canonical", None) if route is not None and route.resource is not None else None
    if template in shapes:
        return shapes[template]
    return ErrorShape.OPENAI if request.path.startswith("/v1/") else ErrorShape.TEI


def unauthorized(message: str = "missing or unknown API key (send 'Authorization: Bearer <key>')") -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str, error_type: str = "not_found") -> ApiError:
    return ApiError(404, error_type, message)


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, "too_large", message, param=param)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, "invalid_request", message, param=param)


def overloaded(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(429, "overloaded", message, {"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": "1"})


def _describe(err: dict[str, Any]) -> str:
    # keep field names and list indexes; drop pydantic's union-branch tags ("list[str]", "function-after[...]")
    loc = [str(p) for p in err.get("loc", ()) if "[" not in str(p) and not str(p).startswith("function-")]
    if err.get("type") == "extra_forbidden":
        # the location's last element is the caller's field name: input, so not shown
        where = ".".join(loc[:-1]) or "body"
        return f"{where}: unknown field (see /openapi.json for the fields this endpoint takes)"
    where = ".".join(loc) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


#: pydantic error types that mean "over a documented size limit": 413, like every other limit
#: (issue #18: an over-long text got 422 while the README promised 413).
_TOO_LONG = {"string_too_long", "too_long"}


def _param(err: dict[str, Any]) -> str | None:
    loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int) and "[" not in str(p)
           and not str(p).startswith("function-")]
    if err.get("type") == "extra_forbidden":
        return None  # the field name is the caller's input
    return loc[0] if loc else None


def validation_error(exc: ValidationError) -> ApiError:
    errs = exc.errors(include_input=False, include_url=False, include_context=False)
    param = _param(errs[0]) if errs else None
    # A union (text | texts | token ids) reports one error per branch; a too-long text is
    # one of them, and says what is wrong better than "should be a list".
    long = [e for e in errs if e.get("type") in _TOO_LONG]
    if long:
        return too_large("input over a size limit: " + _describe(long[0]) + " (limits: GET /info)", _param(long[0]))
    parts = [_describe(e) for e in errs[:_MAX_ERRORS]]
    more = f" (+{len(errs) - _MAX_ERRORS} more)" if len(errs) > _MAX_ERRORS else ""
    return invalid("invalid request: " + "; ".join(parts) + more, param)


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 422 that says why without quoting it."""
    if not raw:
        raise invalid("invalid request: the body is empty (a JSON object is expected)")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise invalid("invalid request: the body is not UTF-8") from None
    except ValueError as exc:
        pos = getattr(exc, "pos", None)
        raise invalid(f"invalid request: the body is not valid JSON (at byte {pos})" if pos is not None
                      else "invalid request: the body is not valid JSON") from None


_REASONS = {404: ("not_found", "no such endpoint (see /openapi.json)"),
            405: ("method_not_allowed", "method not allowed on this endpoint"),
            413: ("too_large", "request body too large")}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Render ApiError and aiohttp's own HTTP errors (unknown route, wrong method, body over
    the server limit) in the one shape; an unexpected exception becomes a 500 whose body says
    nothing about the request (the log has the traceback)."""
    shape = shape_of(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error_type, exc.message, exc.headers, shape=shape, param=exc.param,
                              detail=exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type, message = _REASONS.get(exc.status, ("http_error", exc.reason or "request failed"))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, error_type, message, headers, shape=shape)
    except Exception:  # noqa: BLE001 - the one place that turns a bug into a 500
        import logging

        logging.getLogger("stream.api").exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error (see the worker log)", shape=shape)
