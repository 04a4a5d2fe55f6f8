"""The query-ready memory (issue #22) changes how much a query computes, never the numbers.

Compared against the engine without it (the path test_engine_parity pins to the reference), in
float32 on both backbone families, with the same tolerance as the segment-prefix cache
(test_prefix_cache.py: 1e-5 absolute on embeddings; Qwen3.5 latents relative to their scale):
- one conversation streamed past a full queue (40 turns): every turn's embedding, and a query
  after every turn, equal the uncached ones; queries compute only their own tokens once the
  queue is ready (Qwen3: always; Qwen3.5: plus the queue positions after the 64-position grid);
- conversations batched (several turns of one conversation in one step, queues of different
  lengths in one pass) and queries batched across conversations, hits next to misses;
- eviction by the byte budget, stale states (reloaded at an older turn, reset and replayed with
  other text, written in place), rebalance (the worker drops the cache on revoke) and reload
  (a state read back from its bytes hits and is served exactly; a new engine starts empty).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_engine_parity import make_turns, max_diff
from workers.engine import EngineConfig, EvoEngine, load_engine
from workers.prefix_pass import PrefixState
from workers.query_cache import QueryCache
from workers.state import ConversationState
from workers.tiny_checkpoint import cached_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5
BIG = 1 << 30
QUESTIONS = ["where is my parcel", "refund for the invoice of march please", "reset my password"]


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def engines(request):
    fam = request.param
    plain = load_engine(cached_tiny_checkpoint(fam, "tiny"))
    return fam, plain


def _cached(plain: EvoEngine, budget: int = BIG, prefix: int = BIG) -> EvoEngine:
    return EvoEngine(plain.model, plain.tokenizer,
                     config=EngineConfig(prefix_cache_max_bytes=prefix, query_cache_max_bytes=budget))


def _queries(engine: EvoEngine, states: list[ConversationState | None], qs=QUESTIONS) -> np.ndarray:
    return engine.embed_queries([(st, q) for st in states for q in qs])


def _same(a, b, what: str) -> float:
    d = max_diff(np.asarray(a), np.asarray(b))
    assert d <= TOL, f"{what} differ by {d}"
    return d


def test_streamed_turns_and_queries_equal_the_uncached_path(engines):
    fam, plain = engines
    cached = _cached(plain)
    turns = make_turns("solo", [(3 + i % 7, 2 + i % 5) for i in range(40)], seed=11)
    sa: dict[str, ConversationState] = {}
    sb: dict[str, ConversationState] = {}
    own_only = 0
    for t in turns:
        pre = cached.ready_point(sb["solo"]) if sb else 0   # how much of the turn's queue was ready
        oa, ob = plain.step(sa, [t])[0], cached.step(sb, [t])[0]
        _same(oa.embedding, ob.embedding, f"turn {t.seq} embeddings")
        # the turn's own embedding pass read the queue its predecessor made ready
        assert cached.last_stats.query_reused_positions == pre
        assert sa["solo"].equals(sb["solo"], atol=TOL * (8 if fam == "qwen3_5" else 1))
        one = QUESTIONS[t.seq % len(QUESTIONS):][:1]  # one query per turn keeps this test short
        _same(_queries(plain, [sa["solo"]], one), _queries(cached, [sb["solo"]], one), f"query after turn {t.seq}")
        qs = cached.last_query_stats
        ready = cached.ready_point(sb["solo"]) > 0       # (Qwen3.5: a queue shorter than one chunk is read whole)
        assert qs.hits == (1 if ready else 0)  # every query read a ready queue ...
        tail = sb["solo"].queue.shape[0] - cached.ready_point(sb["solo"])
        assert qs.positions == qs.own_tokens + tail  # ... and computed only its own part
        own_only += tail == 0
    assert own_only >= (40 if fam == "qwen3" else 10)
    assert sb["solo"].memory_len == 512 and cached.ready_point(sb["solo"]) == 512


def test_batches_of_turns_and_of_queries_mix_hits_and_misses(engines):
    fam, plain = engines
    cached = _cached(plain)
    convs = {f"b{c}": make_turns(f"b{c}", [(6 + 3 * c, 4 + (c * 5) % 11)] * 9, seed=c) for c in range(6)}
    # step 1: 1-6 turns per conversation (several waves); step 2: the rest
    steps = [[t for c, ts in enumerate(convs.values()) for t in ts[: 1 + c]],
             [t for c, ts in enumerate(convs.values()) for t in ts[1 + c:]]]
    sa: dict[str, ConversationState] = {}
    sb: dict[str, ConversationState] = {}
    for step in steps:
        oa, ob = plain.step(sa, step), cached.step(sb, step)
        _same(np.stack([o.embedding for o in oa]), np.stack([o.embedding for o in ob]), "batched turn embeddings")
        for cid in sa:
            assert sa[cid].equals(sb[cid], atol=TOL * (8 if fam == "qwen3_5" else 1))
    # a batch of queries: ready conversations, one the cache never saw, no memory at all
    unseen: dict[str, ConversationState] = {}
    for t in make_turns("u", [(5, 5)] * 5, seed=78):
        plain.step(unseen, [t])
    a_states = [sa[c] for c in convs] + [unseen["u"], None]
    b_states = [sb[c] for c in convs] + [unseen["u"], None]
    _same(_queries(plain, a_states), _queries(cached, b_states), "batched queries")
    want_hits = sum(cached.ready_point(st) > 0 for st in b_states[:-2]) * len(QUESTIONS)
    assert cached.last_query_stats.hits == want_hits and want_hits > 0
    # passages (embed_texts) read the same ready memory
    texts = [(st, "the parcel went to the wrong address") for st in b_states]
    _same(plain.embed_texts([(st, t) for st, t in zip(a_states, [x for _, x in texts])]),
          cached.embed_texts(texts), "passages")


def test_eviction_keeps_the_numbers_and_the_budget(engines):
    fam, plain = engines
    probe = _cached(plain)
    s: dict[str, ConversationState] = {}
    for t in make_turns("p", [(4, 3)] * 4, seed=5):
        probe.step(s, [t])
    one = probe.query_cache.bytes  # about one conversation's entry
    small = _cached(plain, budget=int(one * 1.5))
    events: list[str] = []
    small.set_query_cache_hook(lambda ev, n: events.append(ev))
    a = make_turns("A", [(4, 3)] * 5, seed=2)
    b = make_turns("B", [(5, 2)] * 5, seed=3)
    sa: dict[str, ConversationState] = {}
    sb: dict[str, ConversationState] = {}
    for ta, tb in zip(a, b):
        for t in (ta, tb):
            _same(plain.step(sa, [t])[0].embedding, small.step(sb, [t])[0].embedding, "turn embeddings")
        _same(_queries(plain, [sa["A"], sa["B"]]), _queries(small, [sb["A"], sb["B"]]), "queries")
    st = small.query_cache.stats
    assert "evict" in events and st.evictions >= 3 and st.misses >= 3
    assert small.query_cache.bytes <= small.query_cache.max_bytes


def test_stale_states_never_use_an_entry(engines):
    fam, plain = engines
    eng = _cached(plain)
    turns = make_turns("C", [(4, 3)] * 8, seed=4)
    sb: dict[str, ConversationState] = {}
    for t in turns[:6]:
        eng.step(sb, [t])
    sa: dict[str, ConversationState] = {}
    for t in turns[:4]:
        plain.step(sa, [t])
    # 1. reloaded at an older turn (a rebalance that read an older checkpoint): seq 3's queue
    older = sa["C"].copy()
    before = eng.query_cache.stats.hits
    got = _queries(eng, [older])
    # Qwen3: the entry (seq 5's 96 latents) does not match seq 3's 64-latent queue. Qwen3.5: it
    # covers the first 64 latents (its chunk grid), which seq 3's queue shares: valid, used, exact.
    assert eng.query_cache.stats.hits - before == (0 if fam == "qwen3" else len(QUESTIONS))
    _same(_queries(plain, [sa["C"]]), got, "queries on an older state")
    # ... and continuing from the older state equals the plain path
    _same(plain.step(sa, [turns[4]])[0].embedding, eng.step({"C": older}, [turns[4]])[0].embedding, "turn after reload")
    # 2. same id, same seq, other text (deleted, reset, replayed)
    other = make_turns("C", [(4, 3)] * 6, seed=99)
    pa: dict[str, ConversationState] = {}
    for t in other:
        plain.step(pa, [t])
    hits = eng.query_cache.stats.hits
    _same(_queries(plain, [pa["C"]]), _queries(eng, [pa["C"].copy()]), "queries on a reset conversation")
    assert eng.query_cache.stats.hits == hits
    # (continuing conversation C from its older state replaced C's entry: one entry per conversation;
    # on Qwen3.5 the new entry's first 64 latents are still those of the newer state's queue)
    if fam == "qwen3":
        assert eng.query_cache.continuation("C", sb["C"]) is None
    # 3. written in place (the digest's memo follows the tensor's version)
    sd: dict[str, ConversationState] = {}
    for t in make_turns("D", [(4, 3)] * 6, seed=5):
        eng.step(sd, [t])
    st = sd["D"]
    ok = _queries(eng, [st])
    assert eng.last_query_stats.hits == len(QUESTIONS)
    st.latents[-st.memory_len] += 0.5   # the queue's first latent: inside every entry
    hits = eng.query_cache.stats.hits
    changed = _queries(eng, [st])
    assert eng.query_cache.stats.hits == hits and max_diff(ok, changed) > 1e-4
    _same(_queries(plain, [st]), changed, "queries on a state written in place")


def test_reload_from_bytes_hits_and_a_new_engine_or_a_revoke_starts_empty(engines):
    fam, plain = engines
    eng = _cached(plain)
    sb: dict[str, ConversationState] = {}
    for t in make_turns("R", [(6, 4)] * 10, seed=6):
        eng.step(sb, [t])
    reloaded = ConversationState.from_bytes(sb["R"].to_bytes())   # what a load from Redis gives
    want = _queries(plain, [sb["R"]])
    _same(want, _queries(eng, [reloaded]), "queries on a reloaded state")
    assert eng.last_query_stats.hits == len(QUESTIONS)
    # a restarted worker (new engine): nothing cached, the same numbers
    fresh = _cached(plain)
    _same(want, _queries(fresh, [reloaded]), "queries after a restart")
    assert fresh.last_query_stats.hits == 0
    # a rebalance: the worker drops every conversation's cached work on revoke
    eng.drop_conversation_caches()
    assert len(eng.query_cache) == 0 and eng.query_cache.bytes == 0 and len(eng.prefix_cache) == 0
    _same(want, _queries(eng, [reloaded]), "queries after a revoke")
    # the next turn makes the queue ready again
    nxt = make_turns("R", [(6, 4)] * 11, seed=6)[10]
    st = {"R": reloaded}
    eng.step(st, [nxt])
    assert "R" in eng.query_cache


def test_scratch_steps_leave_the_caches_alone(engines):
    fam, plain = engines
    eng = _cached(plain)
    s: dict[str, ConversationState] = {}
    for t in make_turns("S", [(6, 4)] * 3, seed=8):
        eng.step(s, [t])
    entries, stats = (len(eng.prefix_cache), len(eng.query_cache)), eng.last_stats
    with eng.scratch():
        eng.step({"rerank": s["S"].copy()}, make_turns("rerank", [(3, 0)] * 2, seed=9, start=3))
    assert (len(eng.prefix_cache), len(eng.query_cache)) == entries and eng.last_stats is stats


# ---------------------------------------------------------------------------------------------
# the store on its own (our logic in isolation; the tests above run it for real)
# ---------------------------------------------------------------------------------------------
def _st(values: list[float]) -> ConversationState:
    st = ConversationState(hidden_size=2, capacity=8)
    st.latents = torch.tensor([[v, v] for v in values], dtype=torch.float32)
    return st


def _ready(k: int, n_bytes: int) -> PrefixState:
    return PrefixState(length=k, keys={0: torch.zeros(n_bytes // 4)})


def test_store_finds_by_content_replaces_by_conversation_and_evicts_lru():
    seen: list[str] = []
    c = QueryCache(1000, on_event=lambda e, n: seen.append(e))
    a, b = _st([1, 2, 3]), _st([4, 5, 6])
    assert c.store("a", a, _ready(3, 400)) and c.store("b", b, _ready(3, 400))
    assert c.find(_st([1, 2, 3]), 3) is not None          # same bytes, another object: a hit
    assert c.find(_st([1, 2, 9]), 3) is None               # other bytes: a miss
    assert c.find(_st([1, 2, 3, 7]), 3) is not None        # its first 3 latents are those bytes
    c.store("c", _st([7, 8]), _ready(2, 400))              # evicts b (a was used more recently)
    assert "b" not in c and "a" in c and c.bytes == 800 and c.stats.evictions == 1
    assert c.stats.evicted_unused == 1                     # b was never read
    c.store("a", _st([1, 2, 3, 4]), _ready(4, 100))        # a's new entry replaces its old one
    assert c.find(a, 3) is None and c.find(_st([1, 2, 3, 4]), 4) is not None and c.bytes == 500
    assert not c.store("huge", a, _ready(3, 4000)) and c.stats.rejected == 1
    assert c.continuation("a", _st([1, 2, 3, 4, 5])) is not None   # the queue grew: continue it
    assert c.continuation("a", _st([2, 3, 4, 5])) is None          # the queue moved: start over
    c.clear()
    assert len(c) == 0 and c.bytes == 0 and c.find(_st([7, 8]), 2) is None
    assert {"store", "hit", "miss", "evict", "reject"} <= set(seen)
