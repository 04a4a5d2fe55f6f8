"""The HTTP query API (stream/api/) against live workers on the local stack, over real sockets.

One module-scoped worker (authentication on, two API keys bound to different tenants, a small
query queue) serves most tests; conversations are produced through the turns topic first so
that queries read real checkpoints. Expected vectors come from the offline engine / the
reference client (workers/client.py) in this process.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest

from schemas.vectors import decode_vector
from support.oracle import TOL, Expected, expected_for, offline_engine, wait_for_embeddings
from support.traffic import TopicMaker, Traffic, Workers, generate_traffic, pipeline_env, produce
from support.workers import PipelineEnv, WorkerProc

KEY_ACME = "test-key-acme-0123456789"
KEY_GLOBEX = "test-key-globex-0123456789"
KEY_DEFAULT = "test-key-default-tenant-0123"


@dataclass
class Live:
    penv: PipelineEnv
    worker: WorkerProc
    acme: Traffic
    globex: Traffic
    plain: Traffic
    expected_acme: Expected
    expected_globex: Expected
    expected_plain: Expected


def api_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    keys = {KEY_ACME: ["acme"], KEY_GLOBEX: ["globex"], KEY_DEFAULT: [None]}
    env = {"EVOSTREAM_API_AUTH": "required", "EVOSTREAM_API_KEYS": json.dumps(keys),
           "EVOSTREAM_QUERY_QUEUE_MAX": "4", "EVOSTREAM_QUERY_BATCH_MAX": "4",
           "EVOSTREAM_API_MAX_INPUTS": "8", "EVOSTREAM_API_MAX_INPUT_TOKENS": "256",
           "EVOSTREAM_API_MAX_BODY_BYTES": "65536"}
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    topics = TopicMaker(kafka_bootstrap, "api")
    procs = Workers()
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2, extra=api_env())
        worker = procs.add(WorkerProc(penv, tmp_path_factory.mktemp("api"), "api").start())
        # the same conversation ids in two tenants (different turns): tenant scoping is tested on them
        acme = generate_traffic(2, 4, seed=901, prefix="shared", tenant="acme")
        globex = generate_traffic(2, 3, seed=901, prefix="shared", tenant="globex")
        plain = generate_traffic(1, 3, seed=903, prefix="plain")
        produce(kafka_bootstrap, penv.turns_topic, acme.records() + globex.records() + plain.records())
        exp_acme, exp_globex, exp_plain = expected_for(acme), expected_for(globex), expected_for(plain)
        worker.wait_ready()
        keys = acme.keys() | globex.keys() | plain.keys()
        wait_for_embeddings(penv, keys, timeout=300, workers=[worker])
        yield Live(penv, worker, acme, globex, plain, exp_acme, exp_globex, exp_plain)
    finally:
        procs.stop_all()
        topics.close()


def call(worker: WorkerProc, method: str, path: str, body: object = None, *, key: str | None = KEY_ACME,
         raw: bytes | None = None, timeout: float = 60) -> tuple[int, object, dict[str, str]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(worker.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        status, payload, hdrs = exc.code, exc.read(), dict(exc.headers)
    try:
        parsed: object = json.loads(payload) if payload else None
    except ValueError:
        parsed = payload.decode("utf-8", "replace")
    return status, parsed, hdrs


def error_of(body: object) -> tuple[str, str]:
    """(message, type) of an error body in either shape (issue #18): OpenAI's nested one on the
    OpenAI routes, TEI's flat one elsewhere."""
    assert isinstance(body, dict), body
    if isinstance(body.get("error"), dict):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"], body["error"]["code"]
    assert set(body) == {"error", "error_type"}, body
    return body["error"], body["error_type"]


def assert_error(status: int, body: object, want_status: int, want_type: str | None = None) -> None:
    assert status == want_status, (status, body)
    message, kind = error_of(body)
    assert isinstance(message, str) and message
    if want_type is not None:
        assert kind == want_type, body


# --------------------------------------------------------------------------- regressions (issue 9)


def test_query_text_is_stripped_like_the_reference_client(live: Live) -> None:
    """A trailing newline used to change the query embedding (cosine 0.97 vs the reference)."""
    cid = live.plain.conversation_ids[0]
    state = live.expected_plain.states[cid]
    want = offline_engine().embed_queries([(state, "what about the river")])[0]
    status, body, _ = call(live.worker, "POST", "/v1/query",
                           {"conversation_id": cid, "query": "  what about the river\n"}, key=KEY_DEFAULT)
    assert status == 200, body
    got = _vector(body["vector"])
    assert float(np.abs(got - want).max()) <= TOL


def _vector(v: dict) -> np.ndarray:
    from schemas.vectors import EncodedVector

    return decode_vector(EncodedVector.model_validate(v))


def test_unknown_conversation_is_404_not_an_empty_memory(live: Live) -> None:
    status, body, _ = call(live.worker, "POST", "/v1/query", {"conversation_id": "never-seen", "query": "hi"},
                           key=KEY_DEFAULT)
    assert_error(status, body, 404, "conversation_not_found")
    assert "never-seen" not in body["error"]


def test_unknown_route_and_method_use_the_error_shape(live: Live) -> None:
    status, body, _ = call(live.worker, "GET", "/no/such/route")
    assert_error(status, body, 404, "not_found")
    # faust's own views are off: /table/<name>/ answered its own 404 shape, echoing the name
    for path in ("/table/secret-name/", "/router/"):
        status, body, _ = call(live.worker, "GET", path)
        assert_error(status, body, 404, "not_found")
        assert "secret-name" not in json.dumps(body)
    status, body, _ = call(live.worker, "GET", "/v1/embeddings")
    assert_error(status, body, 405, "method_not_allowed")


def test_invalid_request_error_never_echoes_the_input(live: Live) -> None:
    secret = "SECRET-" + "x" * 20
    status, body, _ = call(live.worker, "POST", "/v1/query", {"conversation_id": secret, "query": 42})
    assert_error(status, body, 422, "invalid_request")
    assert secret not in json.dumps(body) and "42" not in body["error"]


@pytest.mark.parametrize("method,path", [("POST", "/v1/embeddings"), ("POST", "/embed"), ("POST", "/rerank"),
                                         ("GET", "/info"), ("GET", "/health"), ("GET", "/openapi.json")])
def test_endpoints_exist(live: Live, method: str, path: str) -> None:
    body = {"POST": {"input": "x", "model": "m"} if path == "/v1/embeddings" else
            {"inputs": "x"} if path == "/embed" else {"query": "x", "texts": ["a"]}}.get(method)
    status, resp, _ = call(live.worker, method, path, body)
    assert status == 200, (path, status, resp)


# --------------------------------------------------------------------------- OpenAI shape


def _openai(worker: WorkerProc, key: str = KEY_ACME):
    from openai import OpenAI

    return OpenAI(base_url=worker.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_embeds_against_a_conversations_memory(live: Live) -> None:
    engine = offline_engine()
    cid = live.acme.conversation_ids[0]
    state = live.expected_acme.states[cid]
    texts = ["where did the train go?", "  coffee in the morning \n"]
    client = _openai(live.worker)
    # the openai client asks for base64 unless told otherwise, and decodes it
    for fmt in (None, "float", "base64"):
        kwargs = {} if fmt is None else {"encoding_format": fmt}
        resp = client.embeddings.create(model="anything", input=texts, extra_body={"conversation_id": cid}, **kwargs)
        assert resp.object == "list" and [d.index for d in resp.data] == [0, 1]
        if fmt == "base64":  # the client hands base64 through when it was asked for explicitly
            got = np.stack([np.frombuffer(__import__("base64").b64decode(d.embedding), "<f4") for d in resp.data])
        else:
            got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        want = engine.embed_queries([(state, t.strip()) for t in texts])
        assert got.shape == (2, engine.embedding_dim)
        assert float(np.abs(got - want).max()) <= TOL
    r = engine.renderer
    assert resp.usage.prompt_tokens == sum(len(r.query_ids(t.strip())) for t in texts) == resp.usage.total_tokens
    assert resp.model == engine.model_name
    assert resp.model_extra["memory"] == {"conversation_id": cid, "tenant": "acme", "applied_seq": 3,
                                          "memory_len": state.memory_len}


def test_openai_passages_and_memoryless(live: Live) -> None:
    engine = offline_engine()
    client = _openai(live.worker)
    resp = client.embeddings.create(model="m", input="a stored passage", encoding_format="float",
                                    extra_body={"input_type": "passage"})
    want = engine.embed_texts([(None, "a stored passage")])[0]
    assert float(np.abs(np.array(resp.data[0].embedding, np.float32) - want).max()) <= TOL
    assert resp.model_extra.get("memory") is None
    resp = client.embeddings.create(model="m", input="hello", encoding_format="float")
    want = engine.embed_queries([(None, "hello")])[0]
    assert float(np.abs(np.array(resp.data[0].embedding, np.float32) - want).max()) <= TOL
    # an unknown conversation, memory-less on request
    resp = client.embeddings.create(model="m", input="hello", encoding_format="float",
                                    extra_body={"conversation_id": "nobody", "unknown_conversation": "memoryless"})
    assert float(np.abs(np.array(resp.data[0].embedding, np.float32) - want).max()) <= TOL
    assert resp.model_extra["memory"]["applied_seq"] == -1


def test_openai_dimensions_are_refused_clearly(live: Live) -> None:
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as info:
        _openai(live.worker).embeddings.create(model="m", input="x", dimensions=256)
    assert info.value.code == "invalid_request" and "dimensions" in info.value.message
    message, kind = error_of(json.loads(info.value.response.text))
    assert kind == "invalid_request" and "dimensions" in message


# --------------------------------------------------------------------------- TEI shapes


def test_tei_embed_shape_and_values(live: Live) -> None:
    engine = offline_engine()
    cid = live.plain.conversation_ids[0]
    state = live.expected_plain.states[cid]
    status, body, _ = call(live.worker, "POST", "/embed", {"inputs": ["one", "two "], "conversation_id": cid},
                           key=KEY_DEFAULT)
    assert status == 200 and isinstance(body, list) and len(body) == 2
    assert all(isinstance(v, list) and len(v) == engine.embedding_dim for v in body)
    want = engine.embed_queries([(state, "one"), (state, "two")])
    assert float(np.abs(np.array(body, np.float32) - want).max()) <= TOL
    status, body, _ = call(live.worker, "POST", "/embed", {"inputs": "one"}, key=KEY_DEFAULT)
    assert status == 200 and len(body) == 1
    status, body, _ = call(live.worker, "POST", "/embed", {"inputs": "one", "normalize": False})
    assert_error(status, body, 422, "invalid_request")


def test_tei_rerank_equals_the_reference_client(live: Live) -> None:
    from workers.client import EvoEmbeddingClient
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    client = EvoEmbeddingClient(cached_tiny_checkpoint("qwen3", "tiny"))
    query = "  which train leaves in the morning?\n"
    texts = ["the morning train leaves at seven", "coffee and apples", "", "winter in Zürich 🙂",
             "a river, a bridge and a quiet forest"]
    ranked, order = client.rerank(query, texts, return_indices=True)
    scores = client.rerank_scores(query, texts)
    status, body, _ = call(live.worker, "POST", "/rerank", {"query": query, "texts": texts, "return_text": True})
    assert status == 200, body
    assert [h["index"] for h in body] == order
    assert [h["text"] for h in body] == ranked
    assert max(abs(h["score"] - float(scores[h["index"]])) for h in body) <= TOL
    status, top, _ = call(live.worker, "POST", "/rerank", {"query": query, "texts": texts, "top_n": 2})
    assert [h["index"] for h in top] == order[:2] and all("text" not in h for h in top)


def test_rerank_against_a_conversation_starts_from_its_memory_and_leaves_it(live: Live) -> None:
    from stream.api.batcher import rerank_pass

    engine = offline_engine()
    cid = live.acme.conversation_ids[1]
    state = live.expected_acme.states[cid]
    texts = ["river", "kafka batch", "orange planet"]
    want = rerank_pass(engine, state, "vector search", texts)
    memless = rerank_pass(engine, None, "vector search", texts)
    assert float(np.abs(want - memless).max()) > 1e-3, "memory must matter for this check to mean anything"
    status, body, _ = call(live.worker, "POST", "/rerank", {"query": "vector search", "texts": texts,
                                                             "conversation_id": cid})
    assert status == 200, body
    assert max(abs(h["score"] - float(want[h["index"]])) for h in body) <= TOL
    status, after, _ = call(live.worker, "POST", "/v1/embeddings", {"input": "x", "model": "m", "conversation_id": cid})
    assert status == 200 and after["memory"]["applied_seq"] == 3  # unchanged by the rerank


def test_info_health_openapi(live: Live) -> None:
    engine = offline_engine()
    status, info, _ = call(live.worker, "GET", "/info", key=None)
    assert status == 200
    assert info["checkpoint"] == engine.fingerprint and info["embedding_dim"] == engine.embedding_dim
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["auth"] == "required"
    assert info["limits"]["max_inputs"] == 8 and info["limits"]["query_queue_max"] == 4
    status, health, _ = call(live.worker, "GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok", health
    assert health["ingestion"]["healthy"] and health["ingestion"]["state"] in ("consuming", "idle"), health
    status, doc, _ = call(live.worker, "GET", "/openapi.json", key=None)
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert {"/v1/embeddings", "/embed", "/rerank", "/info", "/health", "/v1/query", "/v1/models", "/tokenize",
            "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    assert "EmbeddingsRequest" in doc["components"]["schemas"]
    for path in ("/v1/embeddings", "/embed", "/rerank"):
        codes = set(doc["paths"][path]["post"]["responses"])
        assert {"200", "401", "403", "404", "413", "422", "429", "503"} <= codes


# --------------------------------------------------------------------------- auth and tenants


def test_missing_or_unknown_key_is_401(live: Live) -> None:
    for key in (None, "not-a-key-but-long-enough"):
        for path, body in (("/v1/embeddings", {"input": "x", "model": "m"}), ("/rerank", {"query": "q", "texts": ["a"]})):
            status, resp, headers = call(live.worker, "POST", path, body, key=key)
            assert_error(status, resp, 401, "unauthorized")
            assert headers.get("WWW-Authenticate") == "Bearer"


def test_each_key_reads_its_own_tenants_conversation_only(live: Live) -> None:
    cid = live.acme.conversation_ids[0]
    assert cid in live.globex.conversation_ids  # same id, two tenants
    engine = offline_engine()
    for key, tenant, exp, last in ((KEY_ACME, "acme", live.expected_acme, 3),
                                   (KEY_GLOBEX, "globex", live.expected_globex, 2)):
        status, body, _ = call(live.worker, "POST", "/v1/embeddings",
                               {"input": "q", "model": "m", "conversation_id": cid}, key=key)
        assert status == 200, body
        assert body["memory"]["tenant"] == tenant and body["memory"]["applied_seq"] == last
        want = engine.embed_queries([(exp.states[cid], "q")])[0]
        assert float(np.abs(np.array(body["data"][0]["embedding"], np.float32) - want).max()) <= TOL
    # naming the other tenant: refused, for every endpoint, with or without a conversation
    for path, body in (("/v1/embeddings", {"input": "q", "model": "m", "conversation_id": cid, "tenant": "acme"}),
                       ("/embed", {"inputs": "q", "tenant": "acme"}),
                       ("/rerank", {"query": "q", "texts": ["a"], "conversation_id": cid, "tenant": "acme"}),
                       ("/v1/query", {"query": "q", "conversation_id": cid, "tenant": "acme"})):
        status, resp, _ = call(live.worker, "POST", path, body, key=KEY_GLOBEX)
        assert_error(status, resp, 403, "forbidden")
    # the default tenant's conversation is not readable by a tenant-bound key either
    plain = live.plain.conversation_ids[0]
    status, resp, _ = call(live.worker, "POST", "/v1/query", {"query": "q", "conversation_id": plain}, key=KEY_ACME)
    assert_error(status, resp, 404, "conversation_not_found")  # acme has no conversation of that id


# --------------------------------------------------------------------------- error codes


def test_unknown_conversation_404_on_every_endpoint(live: Live) -> None:
    for path, body in (("/v1/embeddings", {"input": "q", "model": "m", "conversation_id": "ghost"}),
                       ("/embed", {"inputs": "q", "conversation_id": "ghost"}),
                       ("/rerank", {"query": "q", "texts": ["a"], "conversation_id": "ghost"})):
        status, resp, _ = call(live.worker, "POST", path, body)
        assert_error(status, resp, 404, "conversation_not_found")
        status, resp, _ = call(live.worker, "POST", path, {**body, "unknown_conversation": "memoryless"})
        assert status == 200, resp


def test_too_large_is_413(live: Live) -> None:
    status, body, _ = call(live.worker, "POST", "/embed", {"inputs": ["x"] * 9})
    assert_error(status, body, 413, "too_large")
    status, body, _ = call(live.worker, "POST", "/rerank", {"query": "q", "texts": ["x"] * 9})
    assert_error(status, body, 413, "too_large")
    status, body, _ = call(live.worker, "POST", "/v1/embeddings", {"input": "word " * 600, "model": "m"})
    assert_error(status, body, 413, "too_large")
    status, body, _ = call(live.worker, "POST", "/embed", raw=b'{"inputs": "' + b"a" * 70000 + b'"}')
    assert_error(status, body, 413, "too_large")


def test_invalid_is_422_without_echo(live: Live) -> None:
    cases = [b"{not json", b"[1, 2]", b"", json.dumps({"input": [[1, "a"]], "model": "m"}).encode(),
             json.dumps({"input": "x", "model": "m", "encoding_format": "int8"}).encode(),
             json.dumps({"input": "x", "model": "m", "secret_field_name": 1}).encode(),
             json.dumps({"input": "x", "model": "m", "conversation_id": "bad\u0001id"}).encode(),
             b'{"input": ["ok", "bad \\ud800 text"], "model": "m"}']  # unpaired surrogate: not text
    for raw in cases:
        status, body, _ = call(live.worker, "POST", "/v1/embeddings", raw=raw)
        assert_error(status, body, 422, "invalid_request")
        message, _ = error_of(body)
        assert "secret_field_name" not in message and "bad" not in message and "int8" not in message


def test_full_query_queue_is_429(live: Live) -> None:
    """Queue of 4 requests: a burst of 48 concurrent requests must be partly refused at once
    (429 with Retry-After), and every accepted one answered."""
    import aiohttp

    async def burst() -> list[tuple[int, dict, dict]]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY_ACME}"}) as s:
            async def one(i: int) -> tuple[int, dict, dict]:
                async with s.post(live.worker.url + "/embed", json={"inputs": [f"text {i}"] * 4}) as r:
                    return r.status, await r.json(), dict(r.headers)
            return await asyncio.gather(*(one(i) for i in range(48)))

    results = asyncio.run(burst())
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    for code, body, headers in results:
        if code == 429:
            assert_error(code, body, 429, "overloaded")
            assert headers.get("Retry-After")


def test_store_unavailable_is_503(live: Live, kafka_bootstrap: str, tmp_path) -> None:
    """A worker whose Redis does not answer: /health and conversation lookups say 503;
    memory-less embeddings still work (they need no store)."""
    from support.workers import free_port

    penv = PipelineEnv(**{**live.penv.__dict__, "redis_url": f"redis://127.0.0.1:{free_port()}/0",
                          "extra": api_env()})
    procs = Workers()
    try:
        w = procs.add(WorkerProc(penv, tmp_path, "noredis").start())
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body, _ = call(w, "GET", "/health", key=None, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or not w.alive():
                    raise AssertionError("worker without Redis never served HTTP:\n" + w.tail())
                time.sleep(0.5)
        assert_error(status, body, 503, "unavailable")
        status, body, _ = call(w, "POST", "/v1/embeddings", {"input": "q", "model": "m", "conversation_id": "c"},
                               timeout=60)
        assert_error(status, body, 503, "unavailable")
        status, body, _ = call(w, "POST", "/v1/embeddings", {"input": "q", "model": "m"}, timeout=60)
        assert status == 200, body
    finally:
        procs.stop_all()


# --------------------------------------------------------------------------- property-based (schemathesis)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_properties(live: Live, mode: str) -> None:
    """schemathesis generates requests from the worker's own /openapi.json (valid ones, then
    invalid ones) for every documented operation and checks each answer: no 5xx, only
    documented status codes and content types, bodies matching the documented schemas (errors
    included), invalid data refused. Key of the default tenant; generated conversations mostly
    do not exist, so 404 is a documented answer. Bounded: 10 examples per operation and mode.

    (Driven through hypothesis directly: schemathesis' pytest plugin does not run under this
    pytest version, `'Function' object has no attribute '_nodeid'`.)"""
    import schemathesis
    from hypothesis import HealthCheck, assume, given, settings

    # 413 is a right answer to schema-valid data: the token limit per text cannot be stated in
    # JSON Schema (the document states the character and item limits).
    # And for invalid data, 413 is how the API refuses a text or list over its documented size
    # limits (one error shape per cause: too_large), next to schemathesis' default list.
    config = schemathesis.Config.from_dict({"checks": {
        "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "413", "429"]},
        "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413",
                                                          "415", "422", "428", "429", "5xx"]}}})
    schema = schemathesis.openapi.from_url(live.worker.url + "/openapi.json", config=config)
    gen_mode = schemathesis.GenerationMode(mode)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 6
    if mode == "negative":  # GET operations take no input that could be made invalid
        operations = [op for op in operations if op.method.upper() == "POST"]
        assert len(operations) >= 4
    for op in operations:
        @given(case=op.as_strategy(generation_mode=gen_mode))
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            # Two lone surrogates that form a pair when JSON-escaped side by side reach the
            # server as ONE character (JSON decoders merge escaped pairs), so a string one
            # "character" over maxLength arrives exactly at it and is rightly accepted: a
            # generator artifact, not a contract violation. Such cases are discarded.
            assume(not _has_surrogates(case.body))
            case.call_and_validate(base_url=live.worker.url, timeout=60,
                                   headers={"Authorization": f"Bearer {KEY_DEFAULT}"})

        run()


def _has_surrogates(value: object) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_surrogates(v) for v in value)
    return False
