"""The streaming engine reproduces the reference's numbers (MODEL_SPEC), on both vocabularies.

Oracle: `workers.reference.run_conversation`, which processes a whole conversation the way the
reference code does (segments grouped up front, one memory pass per segment, turns embedded in
padded batches against the raw latent buffer). The engine instead streams turn by turn, batches
conversations together, and can be stopped / serialised / rebuilt from deltas at any turn; all
of that must give the same numbers.

Tolerances (float32). Qwen3: 1e-5 absolute for embeddings and latents. Qwen3.5: its
linear-attention layers (gated delta rule) run a chunked kernel that computes in float32 with
cumulative sums of the decay gates, so its rounding depends on where the chunks fall, i.e. on
the total row length and on left padding; the tiny checkpoint's fast-decaying gates amplify
that. A streaming memory step ends at the current turn while the reference's ends at the
segment's last turn, and a batched row is padded to the longest row of its pass, so the same
numbers are rounded differently: measured up to 1.5e-5 in embeddings and 6.4e-5 of the
largest |latent| (~7) in latents. Qwen3.5 is therefore checked at 5e-5 absolute for
embeddings and 2e-4 relative to the largest |latent| for latents (a logic error moves numbers
by O(0.1-1)). Evidence that the residue is rounding, not logic: with the kernel's float32
casts switched to float64, padded and unpadded rows agree to 0.0; and where streaming and
the reference run the same sequence (a segment's last turn) the latents are bit-identical
(`test_qwen35_segment_last_turn_is_bitwise`).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from schemas.turns import ChatMessage, TurnInput
from workers import reference
from workers.engine import EngineConfig, EvoEngine, load_engine
from workers.scheduler import Budget
from workers.state import ConversationState, StateDelta, rebuild
from workers.tiny_checkpoint import cached_tiny_checkpoint

# family -> (embedding absolute tolerance, latent tolerance relative to max(1, max |latent|))
TOL = {"qwen3": (1e-5, 1e-5), "qwen3_5": (5e-5, 2e-4)}

_WORDS = (
    "memory queue latent turn river stone cloud apple train window music garden paper light "
    "table silver orange planet coffee bridge winter summer forest ocean mountain yellow quiet "
    "market doctor engine signal number answer question history morning evening kitchen travel "
    "python stream kafka batch vector search recall the a of to and in is it you that was for on "
    "are with as his they be at one have this from or had by hot word but what some we can out "
    "other were all there when up use your how said an each she which do their time if will way"
).split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def make_turns(cid: str, spec: list[tuple[int, int]], seed: int = 0, start: int = 0) -> list[TurnInput]:
    """One turn per (user words, assistant words); 0 words = that side is absent."""
    rng = random.Random(f"{cid}:{seed}")
    out = []
    for k, (u, a) in enumerate(spec):
        msgs = []
        if u:
            msgs.append(ChatMessage(role="user", content=text(rng, u)))
        if a:
            msgs.append(ChatMessage(role="assistant", content=text(rng, a)))
        out.append(TurnInput(conversation_id=cid, seq=start + k, messages=msgs))
    return out


def stream(engine: EvoEngine, turns: list[TurnInput], state: ConversationState | None = None):
    """One step call per turn. Returns (state, outputs)."""
    states = {turns[0].conversation_id: state if state is not None else engine.new_state()}
    outs = []
    for t in turns:
        outs.extend(engine.step(states, [t]))
    return states[turns[0].conversation_id], outs


def run_reference(engine: EvoEngine, turns: list[TurnInput]) -> reference.ReferenceResult:
    mem = [engine.renderer.memory_ids(t) for t in turns]
    emb = [engine.renderer.embedding_ids(t) for t in turns]
    return reference.run_conversation(engine.model, mem, emb, [t.seq for t in turns])


def emb_tol(family: str) -> float:
    return TOL[family][0]


def latent_tol(family: str, ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return TOL[family][1] * (1.0 if family == "qwen3" else scale)


def max_diff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_matches_reference(family: str, engine: EvoEngine, turns, state, outs, ref) -> None:
    # same segment bookkeeping
    starts = {seg[0] for seg in ref.segments}
    assert [o.new_segment for o in outs] == [i in starts for i in range(len(turns))]
    fin = ref.final_state
    assert state.seq == fin.seq == turns[-1].seq
    assert state.snapshot_len == fin.snapshot_len
    assert state.segment_token_ids == fin.segment_token_ids
    assert state.latents.shape == fin.latents.shape
    assert [o.memory_len for o in outs] == [min(e, engine.capacity) for e in ref.buffer_end[:-1]]
    # same numbers
    emb = np.stack([o.embedding for o in outs])
    assert max_diff(emb, ref.embeddings) <= emb_tol(family)
    assert max_diff(state.latents, fin.latents) <= latent_tol(family, fin.latents)
    # every delta's latents are the reference's latents for that turn
    L = engine.L
    deltas = torch.cat([o.delta.latents for o in outs])
    assert max_diff(deltas, ref.raw_buffer) <= latent_tol(family, ref.raw_buffer)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert deltas.shape[0] == L * len(turns)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
FAMILIES = ["qwen3", "qwen3_5"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_engine(request):
    fam = request.param
    return fam, load_engine(cached_tiny_checkpoint(fam, "tiny"))


# Conversation shapes, per family: Qwen3.5 runs slow reference kernels on CPU, so its variants
# are lighter while covering the same boundary.
CASES = {
    "short": {
        "qwen3": [(8, 12), (5, 0), (0, 9), (20, 30), (3, 3)],
        "qwen3_5": [(8, 12), (5, 0), (0, 9), (3, 3)],
    },
    # 20 small turns: the 16-turn rule opens the second segment
    "segment16": {"qwen3": [(6, 8)] * 20, "qwen3_5": [(4, 4)] * 18},
    # ~310 / ~610 token turns: the 2048-token rule opens new segments
    "tokens2048": {"qwen3": [(150, 150)] * 9, "qwen3_5": [(300, 300)] * 5},
    # one turn over 2048 tokens, alone in its segment, between short ones
    "long_turn": {"qwen3": [(10, 10), (1300, 1300), (10, 10)], "qwen3_5": [(5, 5), (1050, 1050), (5, 5)]},
    # more than 32 turns: the queue (512 latents = 32 turns) is past capacity
    "capacity": {"qwen3": [(5 + (i * 7) % 15, (i * 5) % 11) for i in range(40)], "qwen3_5": [(3, 2)] * 34},
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_reference(family_engine, case):
    fam, engine = family_engine
    turns = make_turns(f"{case}", CASES[case][fam], seed=1)
    state, outs = stream(engine, turns)
    ref = run_reference(engine, turns)
    assert_matches_reference(fam, engine, turns, state, outs, ref)

    lens = [len(engine.renderer.memory_ids(t)) for t in turns]
    seg_turns = [len(s) for s in ref.segments]
    # each case really exercises the boundary it is named after
    if case == "segment16":
        assert seg_turns[0] == 16 and len(seg_turns) == 2 and sum(lens[:17]) <= 2048
    elif case == "tokens2048":
        assert len(seg_turns) >= 2 and seg_turns[0] < 16
        first = ref.segments[0]
        assert sum(lens[i] for i in first) + lens[first[-1] + 1] > 2048
    elif case == "long_turn":
        assert lens[1] > 2048 and ref.segments == [[0], [1], [2]]
    elif case == "capacity":
        assert len(turns) > 32 and ref.buffer_end[-1] > engine.capacity
        assert outs[-1].memory_len == engine.capacity
        assert state.queue.shape[0] == engine.capacity
        # queries against the full queue, the reference way
        queries = ["which planet has rings?", "  coffee in the morning  ", ""]
        got = engine.embed_queries([(state, q) for q in queries])
        ids = [engine.renderer.query_ids(q) for q in queries]
        window = ref.raw_buffer[-engine.capacity:]
        want = reference.embed_against(engine.model, ids, [window] * len(ids))
        assert max_diff(got, want) <= emb_tol(fam)
        assert all(i[: len(engine.renderer.instruction)] == engine.renderer.instruction for i in ids)
        # the instruction prefix matters (the check above could not pass by accident)
        plain = engine.embed_queries([(state, queries[0])], instruction=False)
        assert max_diff(plain, got[:1]) > 1e-3


def test_query_without_memory(family_engine):
    fam, engine = family_engine
    got = engine.embed_queries([(None, "a question"), (engine.new_state(), "a question")])
    want = reference.embed_against(engine.model, [engine.renderer.query_ids("a question")], [None])
    assert max_diff(got[0], want[0]) <= emb_tol(fam)
    assert max_diff(got[1], want[0]) <= emb_tol(fam)


# --------------------------------------------------------------------------------------------
# batching across conversations
# --------------------------------------------------------------------------------------------
def _batch_conversations(fam: str) -> dict[str, list[TurnInput]]:
    convs = {}
    for c in range(16):
        n = 1 + c % 5                                   # 1..5 turns
        w = 3 + (c * 5) % (20 if fam == "qwen3" else 9)  # different lengths -> padding
        spec = [(w + k, (c + k) % 4 * 3) for k in range(n)]
        convs[f"conv{c}"] = make_turns(f"conv{c}", spec, seed=7)
    return convs


def _interleave(convs: dict[str, list[TurnInput]]) -> list[TurnInput]:
    """Round robin, except that every third conversation puts its turns back to back."""
    order: list[TurnInput] = []
    queues = {cid: list(ts) for cid, ts in convs.items()}
    while any(queues.values()):
        for i, (cid, q) in enumerate(queues.items()):
            if q:
                order.extend(q if i % 3 == 0 else q[:1])
                del q[: len(q) if i % 3 == 0 else 1]
    return order


@pytest.fixture(scope="module")
def batch_case(family_engine):
    fam, engine = family_engine
    convs = _batch_conversations(fam)
    alone = {cid: stream(engine, ts) for cid, ts in convs.items()}
    return fam, engine, convs, alone


def _check_batch_against_alone(fam, engine, convs, alone, states, outs, batch):
    assert [(o.conversation_id, o.seq) for o in outs] == [(t.conversation_id, t.seq) for t in batch]
    for cid, ts in convs.items():
        st_alone, outs_alone = alone[cid]
        mine = [o for o in outs if o.conversation_id == cid]
        assert [o.seq for o in mine] == [t.seq for t in ts]
        assert [o.new_segment for o in mine] == [o.new_segment for o in outs_alone]
        assert max_diff(np.stack([o.embedding for o in mine]), np.stack([o.embedding for o in outs_alone])) <= emb_tol(fam)
        st = states[cid]
        assert (st.seq, st.snapshot_len, st.segment_token_ids) == (
            st_alone.seq, st_alone.snapshot_len, st_alone.segment_token_ids)
        assert max_diff(st.latents, st_alone.latents) <= latent_tol(fam, st_alone.latents)


def test_batch_of_16_conversations_equals_each_alone(batch_case):
    fam, engine, convs, alone = batch_case
    batch = _interleave(convs)
    states: dict[str, ConversationState] = {}
    outs = engine.step(states, batch)
    assert engine.last_stats.waves == 5 and engine.last_stats.turns == len(batch)
    _check_batch_against_alone(fam, engine, convs, alone, states, outs, batch)


def test_small_budget_forces_several_passes_same_numbers(batch_case):
    fam, engine, convs, alone = batch_case
    small = EvoEngine(engine.model, engine.tokenizer,
                      config=EngineConfig(budget=Budget(max_batch_tokens=160, max_batch_rows=3)))
    batch = _interleave(convs)
    states: dict[str, ConversationState] = {}
    outs = small.step(states, batch)
    stats = small.last_stats
    # two adapters per wave would be 2 passes per wave; the budget must have split them
    assert stats.passes >= 2 * stats.waves + 8
    assert max(rows for _, rows, _ in stats.per_pass) <= 3
    _check_batch_against_alone(fam, engine, convs, alone, states, outs, batch)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padding_layouts_give_the_reference_numbers(batch_case, padding):
    """The reference's masked left padding and our unmasked right padding are both exact."""
    fam, engine, convs, alone = batch_case
    eng = EvoEngine(engine.model, engine.tokenizer, config=EngineConfig(padding=padding))
    assert eng.runner.padding == padding
    batch = _interleave(convs)
    states: dict[str, ConversationState] = {}
    outs = eng.step(states, batch)
    _check_batch_against_alone(fam, engine, convs, alone, states, outs, batch)


# --------------------------------------------------------------------------------------------
# stopping, serialising, deltas
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_run(family_engine):
    """An uninterrupted run over 20 turns (crosses a segment boundary)."""
    fam, engine = family_engine
    turns = make_turns("resume", [(4 + i % 6, 3 + i % 4) for i in range(20)], seed=3)
    state, outs = stream(engine, turns)
    return fam, engine, turns, state, outs


@pytest.mark.parametrize("cuts", [(7,), (7, 17)])
def test_serialise_deserialise_continue_equals_never_stopping(long_run, cuts):
    _, engine, turns, state, outs = long_run
    st = engine.new_state()
    got = []
    start = 0
    for cut in list(cuts) + [len(turns)]:
        st, o = stream(engine, turns[start:cut], st)
        got.extend(o)
        st = ConversationState.from_bytes(st.to_bytes())  # stop here, come back later
        start = cut
    assert st.to_bytes() == state.to_bytes()
    assert np.array_equal(np.stack([o.embedding for o in got]), np.stack([o.embedding for o in outs]))


def test_deltas_rebuild_the_same_state(long_run):
    _, engine, _, state, outs = long_run
    kw = {"hidden_size": engine.hidden_size, "capacity": engine.capacity, "dtype": engine.state_dtype}
    raw = [o.delta.to_bytes() for o in outs]
    assert rebuild(None, raw, **kw).to_bytes() == state.to_bytes()
    # from a base written at turn 11 plus every delta (those already in the base are skipped)
    base = rebuild(None, raw[:12], **kw).to_bytes()
    assert rebuild(base, raw, **kw).to_bytes() == state.to_bytes()
    # a delta survives its own byte form
    d = StateDelta.from_bytes(raw[5])
    assert d.seq == outs[5].delta.seq and torch.equal(d.latents, outs[5].delta.latents)
    # and the deltas are small: one turn's latents and tokens
    assert all(len(r) < len(state.to_bytes()) / 4 for r in raw)


def test_qwen35_segment_last_turn_is_bitwise():
    """Evidence for the Qwen3.5 latent tolerance: where streaming and the reference run the same
    sequence (the last turn of a segment), the latents are identical."""
    engine = load_engine(cached_tiny_checkpoint("qwen3_5", "tiny"))
    turns = make_turns("bitwise", [(3, 2)] * 16, seed=5)
    _, outs = stream(engine, turns)
    ref = run_reference(engine, turns)
    assert ref.segments == [list(range(16))]
    L = engine.L
    assert torch.equal(outs[-1].delta.latents, ref.raw_buffer[-L:])
