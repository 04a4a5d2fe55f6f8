"""The query client (stream/clients/query_client.py): error messages against a refusing port and a
stub HTTP server (4xx/5xx with the server's error body), and `query_vector`, what `evostream
search` ranks the index with (issue #19; moved here from the removed in-memory indexer's tests)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from schemas.events import QueryResponse
from schemas.vectors import encode_vector
from stream.clients.query_client import QueryError, query_url, query_vector, query_worker, query_worker_async
from tests.support.workers import free_port


class _Stub(BaseHTTPRequestHandler):
    replies: dict[str, tuple[int, bytes]] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.replies[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _embeddings_reply(resp: QueryResponse) -> bytes:
    """What a worker's POST /v1/embeddings answers for `resp` (stream/api/models.py)."""
    return json.dumps({"object": "list", "model": resp.model, "checkpoint": resp.checkpoint,
                       "data": [{"object": "embedding", "index": 0, "embedding": resp.vector.b64}],
                       "usage": {"prompt_tokens": 3, "total_tokens": 3},
                       "memory": {"conversation_id": resp.conversation_id, "tenant": None,
                                  "applied_seq": resp.applied_seq, "memory_len": resp.memory_len}}).encode()


def test_query_url() -> None:
    assert query_url("http://h:1") == "http://h:1/v1/embeddings"
    assert query_url("http://h:1/") == "http://h:1/v1/embeddings"
    assert query_url("h:1/v1/query") == "http://h:1/v1/embeddings"  # the older endpoint's URL
    assert query_url("h:1/v1/embeddings") == "http://h:1/v1/embeddings"


def test_query_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(QueryError, match="connection refused") as ei:
        query_worker(url, "c", "q", timeout=5)
    assert f"{url}/v1/embeddings" in str(ei.value) and ei.value.status is None
    with pytest.raises(QueryError, match="connection refused") as ei:
        asyncio.run(query_worker_async(url, "c", "q", timeout=5))
    assert f"{url}/v1/embeddings" in str(ei.value)


def test_query_http_errors_carry_status_and_server_body(stub_server: str) -> None:
    ok = QueryResponse(conversation_id="c", vector=encode_vector(np.ones(4, np.float32)), dim=4, memory_len=16,
                       applied_seq=0, checkpoint="ck", model="m")
    _Stub.replies = {
        "/v1/embeddings": (422, json.dumps({"error": "invalid request: input: bad", "error_type": "invalid_request"}
                                           ).encode()),
        "/a/v1/embeddings": (503, b'{"error": "checkpoint store unavailable; retry later", "error_type": "unavailable"}'),
        "/b/v1/embeddings": (500, b"Internal Server Error"),
        "/c/v1/embeddings": (200, b'{"not": "a response"}'),
        "/ok/v1/embeddings": (200, _embeddings_reply(ok)),
    }
    cases = [(stub_server, 422, "rejected the query (HTTP 422): invalid request: input: bad"),
             (stub_server + "/a", 503, "HTTP 503): checkpoint store unavailable; retry later"),
             (stub_server + "/b", 500, "failed to answer the query (HTTP 500): Internal Server Error"),
             (stub_server + "/c", 200, "not an embeddings response")]
    for url, status, text in cases:
        for call in (lambda: query_worker(url, "c", "q"), lambda: asyncio.run(query_worker_async(url, "c", "q"))):
            with pytest.raises(QueryError) as ei:
                call()
            assert text in str(ei.value) and url + "/v1/embeddings" in str(ei.value) and ei.value.status == status
    assert query_worker(stub_server + "/ok", "c", "q") == ok
    assert asyncio.run(query_worker_async(stub_server + "/ok", "c", "q")) == ok


def test_query_vector_takes_the_memory_and_the_checkpoint(stub_server: str) -> None:
    ok = QueryResponse(conversation_id="c", vector=encode_vector(np.arange(4, dtype=np.float32)), dim=4,
                       memory_len=16, applied_seq=3, checkpoint="ck-9", model="m")
    _Stub.replies = {"/v1/embeddings": (200, _embeddings_reply(ok)),
                     "/bad/v1/embeddings": (401, b'{"error": "missing or unknown API key", "error_type": "x"}')}
    qv = query_vector(stub_server, "q", "c")
    assert qv.checkpoint == "ck-9" and qv.memory.applied_seq == 3
    assert np.array_equal(qv.vector, np.arange(4, dtype=np.float32))
    with pytest.raises(QueryError, match="HTTP 401"):
        query_vector(stub_server + "/bad", "q")
    with pytest.raises(QueryError, match="connection refused"):
        query_vector(f"http://127.0.0.1:{free_port()}", "q")
