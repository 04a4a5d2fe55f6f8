"""Client for a worker's query API (`POST /v1/embeddings`, stream/api/): embed a query
against a conversation's live memory.

`query_worker` (stdlib urllib, for CLIs and scripts) and `query_worker_async` (aiohttp, for
async callers such as the indexer) send an OpenAI-shaped embeddings request with evostream's
extension fields (`conversation_id`, `tenant`, `unknown_conversation`) and return the answer
as a validated `QueryResponse` (vector, `applied_seq`, `memory_len`, checkpoint fingerprint).
Every failure is a `QueryError` whose message names the URL and, for an HTTP error, the status
and the server's own error message, e.g.

    cannot reach the evostream worker at http://127.0.0.1:6066/v1/embeddings: connection refused
    (is `evostream worker` running, and on this port?)
    worker at http://127.0.0.1:6066/v1/embeddings rejected the query (HTTP 401): missing or unknown API key ...

`url` is the worker's base URL (`http://host:port`); a URL that already ends in
`/v1/embeddings` (or the older `/v1/query`), or in `/v1` (the OpenAI clients' `base_url`
habit, issue #18: it used to become `/v1/v1/embeddings`, a 404), is reduced to its base. `api_key` defaults to the
EVOSTREAM_API_KEY environment variable.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from pydantic import ValidationError

from schemas.events import QueryResponse
from schemas.vectors import EncodedVector

QUERY_PATH = "/v1/embeddings"
_OLD_PATH = "/v1/query"
API_KEY_ENV = "EVOSTREAM_API_KEY"
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
    for suffix in (QUERY_PATH, _OLD_PATH, "/v1"):
        if u.endswith(suffix):
            u = u[: -len(suffix)].rstrip("/")
            break
    return u + QUERY_PATH


def _request_body(conversation_id: str | None, text: str, tenant: str | None, unknown_conversation: str) -> bytes:
    # Validate here so that a bad argument fails with pydantic's message, before any I/O.
    from stream.api.models import EmbeddingsRequest

    req = EmbeddingsRequest(input=text, model="evoembedding", encoding_format="base64", conversation_id=conversation_id,
                            tenant=tenant, unknown_conversation=unknown_conversation)
    return req.model_dump_json(exclude_none=True).encode()


def _headers(api_key: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "application/json"}
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def _error_detail(raw: bytes) -> str:
    """The server's error message, shortened: `error` of a JSON error body, else the text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        obj: Any = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):  # OpenAI's shape (/v1/embeddings)
        text = str(obj["error"].get("message") or obj["error"])
    elif isinstance(obj, dict) and "error" in obj:
        msg = str(obj["error"])
        if obj.get("detail") is not None:  # workers before the error_type shape
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


def _parse_response(endpoint: str, status: int, raw: bytes, conversation_id: str) -> QueryResponse:
    from stream.api.models import EmbeddingsResponse

    try:
        resp = EmbeddingsResponse.model_validate_json(raw)
        if len(resp.data) != 1 or not isinstance(resp.data[0].embedding, str) or resp.memory is None:
            raise ValueError("expected one base64 embedding and the memory it was computed against")
        b64 = resp.data[0].embedding
        dim = len(base64.b64decode(b64)) // 4
        return QueryResponse(conversation_id=conversation_id, vector=EncodedVector(dtype="f32", dim=dim, b64=b64),
                             dim=dim, memory_len=resp.memory.memory_len, applied_seq=resp.memory.applied_seq,
                             checkpoint=resp.checkpoint, model=resp.model[:256] or "evoembedding")
    except (ValidationError, ValueError) as exc:
        raise QueryError(f"worker at {endpoint} answered HTTP {status} with a body that is not an embeddings "
                         f"response: {str(exc)[:_MAX_BODY_CHARS]}", url=endpoint, status=status,
                         body=raw.decode("utf-8", errors="replace")) from None


def query_worker(url: str, conversation_id: str, text: str, k: int = 5, timeout: float = 30, *,
                 api_key: str | None = None, tenant: str | None = None,
                 unknown_conversation: str = "error") -> QueryResponse:
    """Embed `text` against the live memory of `conversation_id` on the worker at `url`.
    `unknown_conversation="memoryless"` answers a conversation without memory with an
    empty-memory vector (`applied_seq` -1) instead of an error. (`k` is kept for callers of
    the older API; the worker does not search.)"""
    endpoint = query_url(url)
    status, raw = _post(endpoint, _request_body(conversation_id, text, tenant, unknown_conversation), api_key, timeout)
    return _parse_response(endpoint, status, raw, conversation_id)


def _post(endpoint: str, body: bytes, api_key: str | None, timeout: float) -> tuple[int, bytes]:
    """POST `body`; (status, raw body) of a 2xx. An HTTP error answer becomes the worker's own
    message (`_http_error`), no answer at all `_unreachable`."""
    req = urllib.request.Request(endpoint, data=body, method="POST", headers=_headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
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


async def query_worker_async(url: str, conversation_id: str, text: str, k: int = 5, timeout: float = 30, *,
                             session: Any = None, api_key: str | None = None, tenant: str | None = None,
                             unknown_conversation: str = "error") -> QueryResponse:
    """`query_worker` on the event loop (aiohttp). Pass an `aiohttp.ClientSession` to reuse one."""
    import aiohttp

    endpoint = query_url(url)
    body = _request_body(conversation_id, text, tenant, unknown_conversation)
    own = session is None
    sess = aiohttp.ClientSession() if own else session
    try:
        async with sess.post(endpoint, data=body, timeout=aiohttp.ClientTimeout(total=timeout),
                             headers=_headers(api_key)) as resp:
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
    return _parse_response(endpoint, status, raw, conversation_id)


@dataclass(frozen=True)
class QueryVector:
    """A query embedded by a worker: the vector, the checkpoint that made it (only vectors of
    the same checkpoint are comparable) and the memory it was embedded against (None: none)."""

    vector: np.ndarray
    checkpoint: str
    memory: Any = None  # stream.api.models.MemoryInfo


def query_vector(url: str, text: str, conversation_id: str | None = None, *, tenant: str | None = None,
                 api_key: str | None = None, timeout: float = 30) -> QueryVector:
    """Embed `text` as a query on the worker at `url`: against the live memory of
    `conversation_id` (an empty memory when it has none), or memory-less without a
    conversation. What `evostream search` ranks the index with (issue #19)."""
    from stream.api.models import EmbeddingsResponse

    endpoint = query_url(url)
    status, raw = _post(endpoint, _request_body(conversation_id, text, tenant, "memoryless"), api_key, timeout)
    try:
        r = EmbeddingsResponse.model_validate_json(raw)
        if len(r.data) != 1 or not isinstance(r.data[0].embedding, str):
            raise ValueError("expected one base64 embedding")
        vec = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype="<f4").astype(np.float32)
    except (ValidationError, ValueError) as exc:
        raise QueryError(f"worker at {endpoint} answered HTTP {status} with a body that is not an embeddings "
                         f"response: {str(exc)[:_MAX_BODY_CHARS]}", url=endpoint, status=status,
                         body=raw.decode("utf-8", errors="replace")) from None
    return QueryVector(vec, r.checkpoint, r.memory)


__all__ = ["QueryError", "QueryVector", "query_url", "query_vector", "query_worker", "query_worker_async"]


async def together(*aws: Any) -> list[Any]:
    """Run awaitables concurrently and return their results in order; the first one to fail
    cancels the others (a search waits on the index catch-up and the worker's query at once,
    and must not hang on one when the other has already failed)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [t.result() for t in tasks]
