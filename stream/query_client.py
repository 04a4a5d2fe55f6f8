"""Client for a worker's `POST /v1/query`: embed a query against a conversation's live memory.

`query_worker` (stdlib urllib, for CLIs and scripts) and `query_worker_async` (aiohttp, for
async callers such as the indexer) send a `QueryRequest` and return the validated
`QueryResponse`. Every failure is a `QueryError` whose message names the URL and, for an
HTTP error, the status and the server's own error body, e.g.

    cannot reach the evostream worker at http://127.0.0.1:6066/v1/query: connection refused
    (is `evostream worker` running, and on this port?)
    worker at http://127.0.0.1:6066/v1/query rejected the query (HTTP 400): invalid query request ...

`url` is the worker's base URL (`http://host:port`); a URL that already ends in `/v1/query`
is used as is.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import urllib.error
import urllib.request
from typing import Any

from pydantic import ValidationError

from schemas.events import QueryRequest, QueryResponse

QUERY_PATH = "/v1/query"
_MAX_BODY_CHARS = 2000


class QueryError(RuntimeError):
    """A query could not be answered. `status` is the HTTP status (None when no response
    came back), `body` the server's error body as text (None when there was none)."""

    def __init__(self, message: str, *, url: str, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body


def query_url(url: str) -> str:
    """The full endpoint URL for a worker base URL."""
    u = url.strip()
    if "://" not in u:
        u = "http://" + u
    u = u.rstrip("/")
    return u if u.endswith(QUERY_PATH) else u + QUERY_PATH


def _request_body(conversation_id: str, text: str, k: int) -> bytes:
    # Validate here so that a bad argument fails with pydantic's message, before any I/O.
    return QueryRequest(conversation_id=conversation_id, query=text, k=k).model_dump_json().encode()


def _error_detail(raw: bytes) -> str:
    """The server's error body, shortened: the `error` (+ `detail`) of a JSON body, else the text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        obj: Any = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "error" in obj:
        msg = str(obj["error"])
        if obj.get("detail") is not None:
            msg += ": " + json.dumps(obj["detail"], ensure_ascii=False)
        text = msg
    if len(text) > _MAX_BODY_CHARS:
        text = text[:_MAX_BODY_CHARS] + "..."
    return text or "(empty body)"


def _http_error(endpoint: str, status: int, raw: bytes) -> QueryError:
    detail = _error_detail(raw)
    if 400 <= status < 500:
        what = "rejected the query"
    elif status == 503:
        what = "is not able to answer right now"
    else:
        what = "failed to answer the query"
    return QueryError(f"worker at {endpoint} {what} (HTTP {status}): {detail}", url=endpoint, status=status,
                      body=raw.decode("utf-8", errors="replace"))


def _unreachable(endpoint: str, reason: object) -> QueryError:
    text = str(reason)
    refused = isinstance(reason, ConnectionRefusedError) or (
        isinstance(reason, OSError) and reason.errno == errno.ECONNREFUSED) or "refused" in text.lower()
    if refused:
        msg = (f"cannot reach the evostream worker at {endpoint}: connection refused "
               "(is `evostream worker` running, and on this port?)")
    elif isinstance(reason, (socket.timeout, TimeoutError, asyncio.TimeoutError)) or "timed out" in text.lower():
        msg = f"no answer from the evostream worker at {endpoint}: timed out"
    else:
        msg = f"cannot reach the evostream worker at {endpoint}: {text or type(reason).__name__}"
    return QueryError(msg, url=endpoint)


def _parse_response(endpoint: str, status: int, raw: bytes) -> QueryResponse:
    try:
        return QueryResponse.model_validate_json(raw)
    except ValidationError as exc:
        raise QueryError(f"worker at {endpoint} answered HTTP {status} with a body that is not a QueryResponse: "
                         f"{str(exc)[:_MAX_BODY_CHARS]}", url=endpoint, status=status,
                         body=raw.decode("utf-8", errors="replace")) from None


def query_worker(url: str, conversation_id: str, text: str, k: int = 5, timeout: float = 30) -> QueryResponse:
    """Embed `text` against the live memory of `conversation_id` on the worker at `url`."""
    endpoint = query_url(url)
    req = urllib.request.Request(endpoint, data=_request_body(conversation_id, text, k), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        raise _http_error(endpoint, exc.code, raw) from None
    except urllib.error.URLError as exc:
        raise _unreachable(endpoint, exc.reason) from None
    except (OSError, TimeoutError) as exc:  # timeouts while reading, resets
        raise _unreachable(endpoint, exc) from None
    return _parse_response(endpoint, status, raw)


async def query_worker_async(url: str, conversation_id: str, text: str, k: int = 5, timeout: float = 30, *,
                             session: Any = None) -> QueryResponse:
    """`query_worker` on the event loop (aiohttp). Pass an `aiohttp.ClientSession` to reuse one."""
    import aiohttp

    endpoint = query_url(url)
    body = _request_body(conversation_id, text, k)
    own = session is None
    sess = aiohttp.ClientSession() if own else session
    try:
        async with sess.post(endpoint, data=body, timeout=aiohttp.ClientTimeout(total=timeout),
                             headers={"Content-Type": "application/json", "Accept": "application/json"}) as resp:
            status, raw = resp.status, await resp.read()
    except aiohttp.ClientConnectorError as exc:
        raise _unreachable(endpoint, exc.os_error) from None
    except asyncio.TimeoutError as exc:
        raise _unreachable(endpoint, exc) from None
    except aiohttp.ClientError as exc:
        raise _unreachable(endpoint, exc) from None
    finally:
        if own:
            await sess.close()
    if status >= 400:
        raise _http_error(endpoint, status, raw)
    return _parse_response(endpoint, status, raw)


__all__ = ["QueryError", "query_url", "query_worker", "query_worker_async"]
