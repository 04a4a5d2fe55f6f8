"""`workers.client.EvoEmbeddingClient`: the reference client's encode_messages and rerank.

Expected numbers are built by hand from `workers.reference` (the offline oracle), never from the
engine the client uses.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from schemas.turns import ChatMessage, TurnInput
from workers import reference
from workers.client import EvoEmbeddingClient, messages_to_turns
from workers.loading import load_checkpoint
from workers.rendering import Renderer
from workers.tiny_checkpoint import cached_tiny_checkpoint

ATOL = 1e-5
_WORDS = ("alpha beta gamma delta river stone cloud apple train window music garden paper light table "
          "silver orange planet coffee bridge winter summer forest ocean mountain the a of to and is").split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def client():
    return EvoEmbeddingClient(cached_tiny_checkpoint("qwen3", "tiny"))


def _conversation(n_messages: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    msgs = []
    for i in range(n_messages):
        role = "user" if i % 2 == 0 else "assistant"
        n = 0 if i % 11 == 5 else rng.randint(2, 25)  # an occasional empty message
        msgs.append({"role": role, "content": _text(rng, n)})
    return msgs


def _hand_pairing(msgs: list[dict]) -> list[str]:
    out = []
    for i in range(0, len(msgs), 2):
        u = msgs[i]["content"]
        if i + 1 == len(msgs):
            out.append("User: " + u)
            continue
        a = msgs[i + 1]["content"]
        out.append("Assistant: " + a if u == "" else "User: " + u if a == "" else "User: " + u + "\nAssistant: " + a)
    return out


def _expected_encode(client: EvoEmbeddingClient, messages: list[dict]) -> np.ndarray:
    model = client.model
    r = Renderer(client.tokenizer)
    history = _hand_pairing(messages[:-1])
    texts = history + [messages[-1]["content"].strip()]
    mem_ids = [r.text_ids(t) for t in history]
    raw, _, _ = reference.build_memory(model, mem_ids)
    window = None if raw is None else raw[-model.config.buffer_capacity:]
    return reference.embed_against(model, [r.text_ids(t) for t in texts], [window] * len(texts))


# --------------------------------------------------------------------------------------------
# encode_messages
# --------------------------------------------------------------------------------------------
def test_pairing_is_the_reference_pairing():
    msgs = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": ""}, {"role": "assistant", "content": "only me"},
        {"role": "user", "content": "only you"}, {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "by position"}, {"role": "user", "content": "not by role"},
        {"role": "user", "content": ""},
    ]
    assert messages_to_turns(msgs) == [
        "User: hi\nAssistant: hello", "Assistant: only me", "User: only you",
        "User: by position\nAssistant: not by role", "User: ",
    ]


@pytest.mark.parametrize("n_messages", [81, 84])  # 40 history turns (queue past capacity), + an unpaired one
def test_encode_messages_equals_hand_built_reference(client, n_messages):
    msgs = _conversation(n_messages, seed=n_messages)
    msgs[-1]["content"] = "  where did we go last summer?  \n"
    got = client.encode_messages(msgs)
    n_hist = (n_messages - 1 + 1) // 2
    assert got.shape == (n_hist + 1, client.embedding_dim) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = _expected_encode(client, msgs)
    assert np.abs(got - want).max() <= ATOL
    # the memory really is there: the same query without history embeds differently
    alone = client.encode_messages(msgs[-1:])
    assert np.abs(alone[0] - got[-1]).max() > 1e-3


def test_encode_messages_single_message_and_objects(client):
    got = client.encode_messages([ChatMessage(role="user", content=" just a query ")])
    r = Renderer(client.tokenizer)
    want = reference.embed_against(client.model, [r.text_ids("just a query")], [None])
    assert got.shape == (1, client.embedding_dim)
    assert np.abs(got - want).max() <= ATOL
    with pytest.raises(ValueError, match=r"encode_messages needs at least one message \(the last one is the query\)"):
        client.encode_messages([])


def test_encode_messages_qwen35():
    c = EvoEmbeddingClient(load_checkpoint(cached_tiny_checkpoint("qwen3_5", "tiny")))
    msgs = _conversation(9, seed=3)
    got = c.encode_messages(msgs)
    assert got.shape == (5, c.embedding_dim)
    # Qwen3.5's chunked linear-attention kernel rounds differently with padding (see test_engine_parity)
    assert np.abs(got - _expected_encode(c, msgs)).max() <= 5e-5


# --------------------------------------------------------------------------------------------
# rerank
# --------------------------------------------------------------------------------------------
def _expected_scores(client: EvoEmbeddingClient, query: str, candidates: list) -> np.ndarray:
    """Per-turn-snapshot candidate embeddings (ChatML memory, "User: c" embedding text) from the
    reference oracle, and the instruction-prefixed query against the final window."""
    model = client.model
    r = Renderer(client.tokenizer)
    turns = [TurnInput.model_construct(conversation_id="x", seq=i, messages=[
        ChatMessage(role="user", content=str(c)), ChatMessage(role="assistant", content="")])
        for i, c in enumerate(candidates)]
    mem = [r.chatml_ids(t) for t in turns]
    emb = [r.text_ids("User: " + str(c) if str(c) else "Assistant: ") for c in candidates]
    ref = reference.run_conversation(model, mem, emb)
    window = ref.raw_buffer[-model.config.buffer_capacity:]
    q = reference.embed_against(model, [r.query_ids(query.strip())], [window])[0]
    return ref.embeddings @ q


@pytest.fixture(scope="module")
def candidates():
    rng = random.Random(11)
    return [_text(rng, rng.randint(3, 30)) for _ in range(36)]  # > 32: the queue passes capacity


def test_rerank_order_is_the_reference_order(client, candidates):
    query = "  which planet is near the ocean?  "
    want = _expected_scores(client, query, candidates)
    got = client.rerank_scores(query, candidates)
    assert np.abs(got - want).max() <= ATOL
    ranked, idx = client.rerank(query, candidates, return_indices=True)
    assert idx == sorted(range(len(candidates)), key=lambda i: -want[i])
    assert ranked == [candidates[i] for i in idx]
    assert client.rerank(query, candidates) == ranked
    # per-turn snapshots: the order candidates are given in matters
    rev = client.rerank_scores(query, candidates[::-1])[::-1]
    assert np.abs(rev - got).max() > 1e-4


def test_rerank_top_k_and_indices(client, candidates):
    cands = candidates[:6]
    full, full_idx = client.rerank("coffee", cands, return_indices=True)
    assert sorted(full_idx) == list(range(6))
    assert client.rerank("coffee", cands, top_k=3) == full[:3]
    assert client.rerank("coffee", cands, top_k=3, return_indices=True) == (full[:3], full_idx[:3])
    assert client.rerank("coffee", cands, top_k=0) == []
    assert client.rerank("coffee", cands, top_k=-2, return_indices=True) == ([], [])
    assert client.rerank("coffee", cands, top_k=100) == full
    assert client.rerank("coffee", []) == []
    assert client.rerank("coffee", [], top_k=3, return_indices=True) == ([], [])
    assert client.rerank("coffee", iter(cands)) == full


def test_rerank_odd_candidates(client):
    """Whatever the reference accepts: non-strings (str() of them), duplicates, the empty string."""
    cands = [42, "", "forty two", 42, "the answer"]
    ranked, idx = client.rerank("what is the answer?", cands, return_indices=True)
    assert sorted(idx) == list(range(5)) and ranked == [cands[i] for i in idx]
    want = _expected_scores(client, "what is the answer?", cands)
    assert np.abs(client.rerank_scores("what is the answer?", cands) - want).max() <= ATOL
    assert idx == sorted(range(5), key=lambda i: -want[i])
