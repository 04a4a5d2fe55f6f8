"""What an OpenAI or TEI user expects of the query API (issue #18 items 2 and 3; #21: all HTTP
in stream/api/, the OpenAPI document made from the route table).

Against one live worker (real broker, real Redis, authentication on), with the real `openai`
client where the issue names it:

* errors in the shape each client reads: OpenAI's `{"error": {"message","type","param","code"}}`
  on the OpenAI routes (the client shows message, type and code; before, `e.code`/`e.type`
  were None), TEI's `{"error","error_type"}` elsewhere;
* the TEI/OpenAI features the issue listed: token-id inputs, optional `model`, `/v1/models`,
  `normalize` (refused, saying why), `truncate`, `raw_scores`, `/tokenize`, TEI's `/info`
  fields, 413 for an over-long text;
* every route of the table served and documented, the operator probes included.

Expected vectors come from the offline engine in this process (tests/support/oracle.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.oracle import TOL, offline_engine, wait_for_embeddings
from support.traffic import TopicMaker, Workers, generate_traffic, pipeline_env, produce
from support.workers import WorkerProc
from tests.test_api import KEY_ACME, api_env, call

#: TEI's documented error body (router/src/lib.rs `ErrorResponse`): two strings.
TEI_ERROR_KEYS = {"error", "error_type"}
#: OpenAI's error body, as its Python client reads it (`body["error"]` -> message/type/param/code).
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def compat(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    topics = TopicMaker(kafka_bootstrap, "compat")
    procs = Workers()
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=1, extra=api_env())
        worker = procs.add(WorkerProc(penv, tmp_path_factory.mktemp("compat"), "compat").start())
        acme = generate_traffic(1, 2, seed=77, prefix="compat", tenant="acme")
        produce(kafka_bootstrap, penv.turns_topic, acme.records())
        worker.wait_ready()
        wait_for_embeddings(penv, acme.keys(), timeout=300, workers=[worker])
        yield worker, acme.conversation_ids[0]
    finally:
        procs.stop_all()
        topics.close()


def _client(worker: WorkerProc, key: str | None = KEY_ACME):
    from openai import OpenAI

    return OpenAI(base_url=worker.url + "/v1", api_key=key or "no-key", max_retries=0, timeout=60)


def _openai_error(body: object) -> dict:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == OPENAI_ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["code"], str)
    return err


def _tei_error(body: object, error_type: str | None = None) -> dict:
    assert isinstance(body, dict) and set(body) == TEI_ERROR_KEYS, body
    assert all(isinstance(body[k], str) and body[k] for k in TEI_ERROR_KEYS), body
    if error_type is not None:
        assert body["error_type"] == error_type, body
    return body


# --------------------------------------------------------------------------- item 2: error shapes


def test_openai_client_shows_message_type_and_code(compat) -> None:
    import openai

    worker, cid = compat
    with pytest.raises(openai.AuthenticationError) as e:
        _client(worker, key="sk-not-a-configured-key-000").embeddings.create(model="m", input="x")
    assert e.value.status_code == 401 and e.value.code == "unauthorized" and e.value.type == "invalid_request_error"
    assert "missing or unknown API key" in str(e.value), str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        _client(worker).embeddings.create(model="m", input="x", extra_body={"conversation_id": "nobody-here"})
    assert e.value.code == "conversation_not_found" and "no memory for this conversation" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _client(worker).embeddings.create(model="m", input="x", dimensions=3)
    assert e.value.code == "invalid_request" and e.value.param == "dimensions" and "dimensions" in str(e.value)
    # the raw bodies: OpenAI's nested shape on the OpenAI routes, unknown /v1/ paths included
    for method, path, body, status in (("POST", "/v1/embeddings", {"input": "x", "dimensions": 3}, 422),
                                       ("GET", "/v1/no-such-thing", None, 404),
                                       ("GET", "/v1/embeddings", None, 405)):
        got, resp, _ = call(worker, method, path, body)
        assert got == status, (path, got, resp)
        _openai_error(resp)


def test_tei_routes_answer_in_teis_error_shape(compat) -> None:
    worker, _ = compat
    for method, path, body, status, kind in (
            ("POST", "/embed", {"inputs": "x", "conversation_id": "nobody-here"}, 404, "conversation_not_found"),
            ("POST", "/rerank", {"query": "q"}, 422, "invalid_request"),
            ("POST", "/embed", {"inputs": "x"}, 401, "unauthorized"),
            ("GET", "/no/such/route", None, 404, "not_found"),
            ("POST", "/info", {}, 405, "method_not_allowed"),
            ("POST", "/healthz", {}, 405, "method_not_allowed"),   # operator probes: the same shape (#21)
            ("DELETE", "/metrics", None, 405, "method_not_allowed")):
        got, resp, _ = call(worker, method, path, body, key=None if kind == "unauthorized" else KEY_ACME)
        assert got == status, (path, got, resp)
        _tei_error(resp, kind)


# --------------------------------------------------------------------------- item 3: the gaps


def test_token_id_inputs_embed_like_their_text(compat) -> None:
    worker, cid = compat
    engine = offline_engine()
    tok = engine.renderer.tok
    texts = ["where did the train go?", "Zürich café 🙂"]
    ids = [tok.encode(t) for t in texts]
    client = _client(worker)
    many = client.embeddings.create(model="m", input=ids, encoding_format="float")
    one = client.embeddings.create(model="m", input=ids[0], encoding_format="float")
    want = engine.embed_queries([(None, t) for t in texts])
    got = np.array([d.embedding for d in many.data], np.float32)
    assert float(np.abs(got - want).max()) <= TOL
    assert float(np.abs(np.array(one.data[0].embedding, np.float32) - want[0]).max()) <= TOL
    status, body, _ = call(worker, "POST", "/v1/embeddings", {"input": ids[0]})  # `model` is optional (as in TEI)
    assert status == 200 and len(body["data"]) == 1, body
    status, body, _ = call(worker, "POST", "/embed", {"inputs": ids, "input_type": "passage"})
    assert status == 200, body
    want_p = engine.embed_texts([(None, t) for t in texts])
    assert float(np.abs(np.array(body, np.float32) - want_p).max()) <= TOL
    # a special token's id is not text: refused, saying why
    status, body, _ = call(worker, "POST", "/v1/embeddings", {"input": [[engine.renderer.eot]]})
    err = _openai_error(body)
    assert status == 422 and "special tokens" in err["message"] and err["param"] == "input"


def test_v1_models_lists_and_retrieves_the_one_model(compat) -> None:
    import openai

    worker, _ = compat
    engine = offline_engine()
    client = _client(worker)
    models = client.models.list()
    assert [m.id for m in models.data] == [engine.model_name]
    assert client.models.retrieve(engine.model_name).id == engine.model_name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("text-embedding-3-small")
    assert e.value.code == "model_not_found" and engine.model_name in str(e.value)


def test_normalize_false_is_refused_saying_why(compat) -> None:
    worker, _ = compat
    status, body, _ = call(worker, "POST", "/embed", {"inputs": "x", "normalize": False})
    _tei_error(body, "invalid_request")
    assert status == 422 and "normalises its embeddings inside the model" in body["error"], body
    status, body, _ = call(worker, "POST", "/embed", {"inputs": "x", "normalize": True})
    assert status == 200 and abs(float(np.linalg.norm(body[0])) - 1.0) < 1e-4


def test_truncate_cuts_over_long_inputs_instead_of_413(compat) -> None:
    worker, _ = compat
    engine = offline_engine()
    tok = engine.renderer.tok
    long = " ".join(f"word{i} river stone" for i in range(200))  # ~1000 tokens; the limit is 256
    assert len(tok.encode(long)) > 256
    status, body, _ = call(worker, "POST", "/embed", {"inputs": long})
    assert status == 413, body
    _tei_error(body, "too_large")
    for direction in ("right", "Left"):
        status, body, _ = call(worker, "POST", "/embed", {"inputs": long, "truncate": True,
                                                          "truncation_direction": direction})
        assert status == 200, body
        from stream.api.models import TruncationDirection
        from stream.api.routes import truncate_text

        kept = truncate_text(tok, long, 255, TruncationDirection(direction.lower()))
        assert len(tok.encode(kept)) <= 255 and (kept.split()[0] == "word0") == (direction == "right")
        want = engine.embed_queries([(None, kept.strip())])[0]
        assert float(np.abs(np.array(body[0], np.float32) - want).max()) <= TOL


def test_rerank_accepts_raw_scores_with_the_same_numbers(compat) -> None:
    worker, _ = compat
    req = {"query": "which train?", "texts": ["the morning train", "apples", "a quiet river"]}
    status, plain, _ = call(worker, "POST", "/rerank", req)
    assert status == 200, plain
    status, raw, _ = call(worker, "POST", "/rerank", {**req, "raw_scores": True})
    assert status == 200, raw
    assert [h["index"] for h in raw] == [h["index"] for h in plain]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(raw, plain)) <= 1e-6


def test_tokenize_shows_the_tokens_the_model_reads(compat) -> None:
    worker, _ = compat
    tok = offline_engine().renderer.tok
    eot = offline_engine().renderer.eot
    texts = ["hello world", "Zürich 🙂"]
    status, body, _ = call(worker, "POST", "/tokenize", {"inputs": texts})
    assert status == 200, body
    for text, toks in zip(texts, body):
        assert [t["id"] for t in toks] == tok.encode(text) + [eot]
        plain, special = toks[:-1], toks[-1]
        assert all(not t["special"] and text[t["start"]:t["stop"]] == t["text"] for t in plain)
        assert special["special"] and special["start"] is None and special["id"] == eot
    status, body, _ = call(worker, "POST", "/tokenize", {"inputs": "hello", "add_special_tokens": False})
    assert status == 200 and [t["id"] for t in body[0]] == tok.encode("hello")
    status, body, _ = call(worker, "POST", "/tokenize", {"inputs": "hello"}, key=None)
    _tei_error(body, "unauthorized")


def test_info_has_teis_fields(compat) -> None:
    worker, _ = compat
    status, info, _ = call(worker, "GET", "/info", key=None)
    assert status == 200
    # TEI's Info (router/src/lib.rs): every field, with our values
    assert info["model_type"] == {"embedding": {"pooling": "last_token"}}
    assert info["model_dtype"] == "float32" and info["auto_truncate"] is False
    assert info["max_client_batch_size"] == 8 and info["max_concurrent_requests"] == 4
    assert info["max_batch_requests"] == 4 and info["max_input_length"] == 256
    assert info["max_batch_tokens"] == 32768 and info["tokenization_workers"] == 1
    for key in ("model_id", "model_sha", "version", "sha", "docker_label"):
        assert key in info, key


def test_over_long_text_is_413_not_422(compat) -> None:
    worker, _ = compat
    text = "x" * 9000  # over the 8192-character limit of a text
    status, body, _ = call(worker, "POST", "/embed", {"inputs": [text]})
    assert status == 413, body
    _tei_error(body, "too_large")
    status, body, _ = call(worker, "POST", "/v1/embeddings", {"input": text})
    assert status == 413 and _openai_error(body)["code"] == "too_large", body
    status, body, _ = call(worker, "POST", "/rerank", {"query": "q", "texts": ["a", text]})
    assert status == 413, body


# --------------------------------------------------------------------------- #21: one route table


def test_every_route_is_served_and_documented(compat) -> None:
    """The OpenAPI document is made from the route table: every documented operation is
    served (no 404/405), the probes and /metrics included, and the document lists exactly the
    table's routes."""
    from stream.api.table import ROUTES

    worker, _ = compat
    status, doc, _ = call(worker, "GET", "/openapi.json", key=None)
    assert status == 200
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    table = {(r.method, r.doc_path) for r in ROUTES}
    assert documented == table
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/models"),
            ("POST", "/tokenize")} <= documented
    for method, path in sorted(documented):
        url_path = path.replace("{model}", offline_engine().model_name)
        got, resp, _ = call(worker, method, url_path, {} if method == "POST" else None)
        assert got not in (404, 405) or (isinstance(resp, dict) and resp.get("error_type") == "conversation_not_found"), \
            (method, path, got, resp)
    status, text, headers = call(worker, "GET", "/metrics", key=None)
    assert status == 200 and "evostream_ingestion_healthy" in text and headers["Content-Type"].startswith("text/plain")


def test_query_command_accepts_the_openai_base_url(compat) -> None:
    """`--url http://host:port/v1`, the `base_url` habit of OpenAI clients (issue #18 item 5),
    used to be sent to /v1/v1/embeddings (404)."""
    from tests.test_cli import run_cli

    worker, cid = compat
    p = run_cli("query", "--url", worker.url + "/v1", "-c", cid, "-t", "what about the river", "--tenant", "acme",
                EVOSTREAM_API_KEY=KEY_ACME)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["conversation_id"] == cid and out["applied_seq"] == 1
