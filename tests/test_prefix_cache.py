"""The segment-prefix cache (issue 10) changes how much is computed, never the numbers.

Compared against the engine without the cache (the path `test_engine_parity` pins to the
reference), in float32 on both backbone families:
- one conversation streamed turn by turn: every turn after a segment's first continues from the
  cache (Qwen3.5's linear-attention kernel is driven on the very chunks of an uncached pass, see
  workers/prefix_pass.py; measured bit-identical for the first 22 turns of this test);
- conversations batched together, continuing prefixes of different lengths in one pass, mixed
  with rows that have none (new segments, misses);
- entries evicted by the byte budget, and entries that do not belong to the state they are asked
  for (a state reloaded at an older turn, a conversation reset and replayed with other text):
  recomputed, never used.
Tolerance: 1e-5 absolute; Qwen3.5 latents 1e-5 relative to the largest |latent| (~7.6 here), as
in test_engine_parity. Why Qwen3.5 latents need the scale: its full-attention layer runs the fused
causal kernel without the cache and the masked kernel with it (~1e-6 apart), and the tiny
checkpoint's fast-decaying gates amplify a 2e-6 change of the queue ~10x in the next segment's
latents (measured: 2.7e-5 absolute at turn 33, while embeddings stay within 1e-7). In batched
passes rows of different lengths share matmuls, which rounds differently again, cache or not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.engine import EngineConfig, EvoEngine, load_engine
from workers.prefix_cache import PrefixCache, prefix_key
from workers.prefix_pass import PrefixState
from workers.state import ConversationState
from workers.tiny_checkpoint import cached_tiny_checkpoint

from tests.test_engine_parity import make_turns, max_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5
BIG = 1 << 30


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def engines(request):
    fam = request.param
    plain = load_engine(cached_tiny_checkpoint(fam, "tiny"))
    cached = EvoEngine(plain.model, plain.tokenizer, config=EngineConfig(prefix_cache_max_bytes=BIG))
    return fam, plain, cached


def _stream(engine: EvoEngine, turns, states=None):
    states = {} if states is None else states
    outs = []
    for t in turns:
        outs.extend(engine.step(states, [t]))
    return states, outs


def _compare(outs_a, outs_b, states_a, states_b, latent_scale: bool = False) -> tuple[float, float]:
    assert [(o.conversation_id, o.seq, o.new_segment, o.memory_len) for o in outs_a] == \
        [(o.conversation_id, o.seq, o.new_segment, o.memory_len) for o in outs_b]
    de = max_diff(np.stack([o.embedding for o in outs_a]), np.stack([o.embedding for o in outs_b]))
    dl = max_diff(torch.cat([o.delta.latents for o in outs_a]), torch.cat([o.delta.latents for o in outs_b]))
    for cid, st in states_a.items():
        other = states_b[cid]
        assert (st.seq, st.snapshot_len, st.segment_token_ids) == (other.seq, other.snapshot_len, other.segment_token_ids)
        dl = max(dl, max_diff(st.latents, other.latents))
    scale = max(1.0, max(float(o.delta.latents.abs().max()) for o in outs_a)) if latent_scale else 1.0
    assert de <= TOL, f"embeddings differ by {de}"
    assert dl <= TOL * scale, f"latents differ by {dl} (scale {scale})"
    return de, dl


def test_one_conversation_streamed_equals_uncached(engines):
    fam, plain, cached = engines
    cached.prefix_cache.clear()
    # 36 turns: two segment boundaries (16-turn rule) and a queue past capacity (32 turns)
    turns = make_turns("solo", [(3 + i % 7, 2 + i % 5) for i in range(36)], seed=11)
    sa, oa = _stream(plain, turns)
    reused = []
    sb: dict[str, ConversationState] = {}
    ob = []
    for t in turns:
        ob.extend(cached.step(sb, [t]))
        reused.append(cached.last_stats.reused_positions)
    _compare(oa, ob, sa, sb, latent_scale=(fam == "qwen3_5"))
    # the cache really was used: every turn that continues a segment reused its prefix
    cont = [not o.new_segment for o in ob]
    # (Qwen3.5 keeps its prefix to a multiple of 64 positions: a segment's second turn may follow
    # a first one shorter than that, with nothing to reuse yet)
    slack = 2 if fam == "qwen3_5" else 0
    assert sum(cont) >= 30 and sum(r > 0 for r, c in zip(reused, cont) if c) >= sum(cont) - slack
    assert all(r == 0 for r, c in zip(reused, cont) if not c)


def test_batched_prefixes_of_different_lengths(engines):
    fam, plain, cached = engines
    cached.prefix_cache.clear()
    # 8 conversations of 6 turns (~30-90 tokens each). Step 1 applies 1-4 turns of each, so in
    # step 2, where every conversation brings its next turn (plus one brand-new conversation), one
    # pass continues prefixes of several lengths next to a row that has none; step 3 the rest.
    convs = {f"b{c}": make_turns(f"b{c}", [(8 + 4 * c, 6 + (c * 7) % 20)] * 6, seed=c) for c in range(8)}
    fresh = make_turns("fresh", [(12, 9)] * 2, seed=50)
    steps = [
        [t for c, ts in enumerate(convs.values()) for t in ts[: 1 + c % 4]],
        [ts[1 + c % 4] for c, ts in enumerate(convs.values())] + fresh[:1],
        [t for c, ts in enumerate(convs.values()) for t in ts[2 + c % 4:]] + fresh[1:],
    ]
    sa: dict[str, ConversationState] = {}
    sb: dict[str, ConversationState] = {}
    oa, ob = [], []
    # record each pass's prefix lengths (a wrapper: the pass itself runs unchanged)
    starts_per_pass: list[list[int]] = []
    real_run = cached.prefix_pass.run

    def recording_run(embeds, lengths, prefixes, keep, *args, **kwargs):
        starts_per_pass.append([0 if p is None else p.length for p in prefixes])
        return real_run(embeds, lengths, prefixes, keep, *args, **kwargs)

    cached.prefix_pass.run = recording_run
    hits = 0
    try:
        for step in steps:
            oa.extend(plain.step(sa, step))
            ob.extend(cached.step(sb, step))
            hits += cached.last_stats.prefix_hits
    finally:
        del cached.prefix_pass.run
    # some pass continued several different prefix lengths next to a row that had none
    assert hits >= 10
    assert max(len(set(s) - {0}) for s in starts_per_pass if 0 in s) >= 3, starts_per_pass
    _compare(oa, ob, sa, sb, latent_scale=(fam == "qwen3_5"))


def test_eviction_and_stale_entries_recompute(engines):
    fam, plain, _ = engines
    one_entry = EvoEngine(plain.model, plain.tokenizer, config=EngineConfig(prefix_cache_max_bytes=BIG))
    events: list[str] = []
    one_entry.set_prefix_cache_hook(lambda ev, n: events.append(ev))
    a = make_turns("A", [(4, 3)] * 6, seed=2)
    b = make_turns("B", [(5, 2)] * 6, seed=3)
    # size the budget to one conversation's prefix: alternating A and B evicts every time
    probe = {}
    one_entry.step(probe, a[:2])
    one_entry.prefix_cache.max_bytes = int(one_entry.prefix_cache.bytes * 1.5)
    one_entry.prefix_cache.clear()
    events.clear()
    order = [t for pair in zip(a, b) for t in pair]
    sa, oa = _stream(plain, order)
    sb, ob = _stream(one_entry, order)
    _compare(oa, ob, sa, sb)
    st = one_entry.prefix_cache.stats
    assert "evict" in events and st.evictions >= 2 and st.misses >= 4  # recomputed after eviction
    assert one_entry.prefix_cache.bytes <= one_entry.prefix_cache.max_bytes

    # stale 1: the state is reloaded at an older turn (a rebalance that read an older checkpoint)
    eng = EvoEngine(plain.model, plain.tokenizer, config=EngineConfig(prefix_cache_max_bytes=BIG))
    turns = make_turns("C", [(4, 3)] * 7, seed=4)
    st_b, _ = _stream(eng, turns[:3])
    older = st_b["C"].copy()
    _stream(eng, turns[3:5], st_b)                      # cache now continues seq 4
    sb = {"C": older}
    ob = eng.step(sb, [turns[3]])                       # seq 3 again, from the older state
    assert eng.prefix_cache.stats.stale == 1 and eng.last_stats.prefix_hits == 0
    sa = {"C": older.copy()}
    sa_plain, _ = _stream(plain, turns[:3])
    oa = plain.step(sa_plain, [turns[3]])
    _compare(oa, ob, sa_plain, sb)

    # stale 2: same id, same seq, other text (deleted, then reset and replayed)
    other = make_turns("C", [(4, 3)] * 4, seed=99)
    eng2 = EvoEngine(plain.model, plain.tokenizer, config=EngineConfig(prefix_cache_max_bytes=BIG))
    _stream(eng2, turns[:3])
    fresh = {"C": eng2.new_state()}
    # rebuild the other conversation's state up to seq 2 without the cache seeing it
    pa, _ = _stream(plain, other[:3])
    fresh["C"] = pa["C"].copy()
    ob = eng2.step(fresh, [other[3]])
    assert eng2.prefix_cache.stats.stale == 1
    oa = plain.step(pa, [other[3]])
    _compare(oa, ob, pa, fresh)


# ---------------------------------------------------------------------------------------------
# the store on its own (our logic in isolation; the tests above run it for real)
# ---------------------------------------------------------------------------------------------
def _state(seq: int, tokens: list[list[int]]) -> ConversationState:
    st = ConversationState(hidden_size=4, capacity=8)
    st.latents = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    st.snapshot_len = 3
    st.segment_token_ids = tokens
    st.seq = seq
    return st


def _prefix(n_bytes: int) -> PrefixState:
    return PrefixState(length=1, keys={0: torch.zeros(n_bytes // 4)})


def test_store_is_lru_within_its_byte_budget_and_reports():
    seen: list[tuple[str, int]] = []
    c = PrefixCache(1000, on_event=lambda e, n: seen.append((e, n)))
    s1, s2, s3 = _state(1, [[1]]), _state(2, [[2]]), _state(3, [[3]])
    assert c.store("a", s1, _prefix(400)) and c.store("b", s2, _prefix(400))
    assert c.lookup("a", s1) is not None           # a is now the most recent
    assert c.store("c", s3, _prefix(400))          # evicts b, the least recently used
    assert "b" not in c and "a" in c and "c" in c and c.bytes == 800
    assert not c.store("huge", s1, _prefix(4000))  # larger than the budget: refused, nothing evicted
    assert c.lookup("b", s2) is None
    assert [e for e, _ in seen] == ["store", "store", "hit", "evict", "store", "reject", "miss"]


def test_key_tracks_what_the_prefix_depends_on():
    base = _state(5, [[1, 2], [3]])
    assert prefix_key(base) == prefix_key(base.copy())
    moved = base.copy(); moved.seq = 6
    retok = base.copy(); retok.segment_token_ids = [[1, 2], [4]]
    resnap = base.copy(); resnap.latents = resnap.latents + 1
    for other in (moved, retok, resnap):
        assert prefix_key(other) != prefix_key(base)
    c = PrefixCache(1 << 20)
    c.store("x", base, _prefix(64))
    assert c.lookup("x", resnap) is None and "x" not in c and c.stats.stale == 1


def test_why_qwen35_prefixes_end_on_the_chunk_grid():
    """Evidence for prefix_pass's design: continuing Qwen3.5 from transformers' own cache at a
    point off the 64-position chunk grid rounds visibly differently from one pass (so the cache
    would not be exact), on the grid it does not. If transformers ever makes the off-grid
    continuation exact, this fails and the alignment (PrefixPass.align) could be dropped."""
    from transformers import DynamicCache

    engine = load_engine(cached_tiny_checkpoint("qwen3_5", "tiny"))
    m, bb = engine.model, engine.model.backbone
    g = torch.Generator().manual_seed(0)
    x = m.embed_ids(torch.randint(0, 150000, (1, 300), generator=g))
    pos = torch.arange(300)[None]
    m.switch.active = "memory_generator"
    try:
        with torch.no_grad():
            full = bb(inputs_embeds=x, use_cache=False).last_hidden_state
            diffs = {}
            for p in (100, 128):
                cache = DynamicCache(config=bb.config)
                bb(inputs_embeds=x[:, :p], position_ids=pos[:, :p], past_key_values=cache, use_cache=True)
                rest = bb(inputs_embeds=x[:, p:], position_ids=pos[:, p:], past_key_values=cache, use_cache=True)
                diffs[p] = float((rest.last_hidden_state - full[:, p:]).abs().max())
    finally:
        m.switch.active = None
    # measured: 3.6e-4 off the grid, 1.5e-5 on it (the rest is the full-attention layer's rounding)
    assert diffs[100] > 1e-4 and diffs[100] > 5 * diffs[128], diffs
