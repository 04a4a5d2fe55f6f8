"""One error shape for every non-2xx answer: `{"error": <message>, "error_type": <type>}`.

Why one shape: callers (and the OpenAI/TEI client libraries) branch on the status and show
the message; three shapes meant three parsers. Why messages never contain input: request
bodies carry conversation text, and error bodies end up in logs and dashboards that must not
hold it. Validation errors are therefore described by *where* (the field path, which names
only fields of our own models) and *what* (pydantic's message, which does not quote the
value), never by the offending value; an unknown field is reported without its name.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from stream.api.models import ErrorBody

_MAX_ERRORS = 5


class ApiError(Exception):
    """Raised anywhere under a handler; the middleware renders it."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=message, error_type=error_type).model_dump_json()
    return web.Response(status=status, body=body.encode(), content_type="application/json", headers=headers)


def unauthorized(message: str = "missing or unknown API key (send 'Authorization: Bearer <key>')") -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str, error_type: str = "not_found") -> ApiError:
    return ApiError(404, error_type, message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


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


def validation_error(exc: ValidationError) -> ApiError:
    errs = exc.errors(include_input=False, include_url=False, include_context=False)
    parts = [_describe(e) for e in errs[:_MAX_ERRORS]]
    more = f" (+{len(errs) - _MAX_ERRORS} more)" if len(errs) > _MAX_ERRORS else ""
    return invalid("invalid request: " + "; ".join(parts) + more)


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
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error_type, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type, message = _REASONS.get(exc.status, ("http_error", exc.reason or "request failed"))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, error_type, message, headers)
    except Exception:  # noqa: BLE001 - the one place that turns a bug into a 500
        import logging

        logging.getLogger("stream.api").exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error (see the worker log)")
