"""Issue #17 item 4: a mixed fleet (bfloat16 and float32 workers in one group) loses no turn.

Before: the bfloat16 worker dead-lettered a float32-written conversation as
`checkpoint_corrupt` ("stored shape ... float32 does not match"); the float32 worker then
applied the next turn over the gap; replaying the dead letter unchanged, as the README advises,
dropped it as a duplicate: the turn was lost from memory for good.

Now: a turn dead-lettered because its conversation's memory could not be read (quarantine)
holds the conversation on every worker (later turns are dead-lettered behind it, never
applied over the hole), and replaying the dead letters in order once the fault is repaired
applies them. A worker refuses to join a store written in another precision unless told to
adopt it (tests/test_store_identity.py), and when told it stores in the store's precision, so
the fleet never mixes dtypes in Redis.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.oracle import TOL, compute_expected, state_difference
from tests.support.pipeline_harness import Harness, run, turn_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bf16_engine():
    from workers.engine import load_engine
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    return load_engine(cached_tiny_checkpoint("qwen3", "tiny"), dtype="bfloat16")


@pytest.fixture(scope="module")
def bf16():
    return bf16_engine()


@pytest.mark.parametrize("rebalance", [True, False], ids=["caches-dropped", "stale-cache"])
def test_quarantined_turn_is_replayable_after_the_repair(redis_url: str, bf16, rebalance: bool) -> None:
    """stale-cache: the float32 worker kept its cached state (no revoke seen): the commit
    script itself refuses to commit past the held turn."""
    ns = f"mix{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        a = Harness(redis_url, ns)                 # float32, the fleet that wrote the store
        b = Harness(redis_url, ns, engine=bf16)    # a bfloat16 worker that joined the group
        try:
            await a.turns("m1", [0, 1, 2])
            if rebalance:
                a.pipeline.cache.revoke({0})        # a rebalance: the partition moves to the bfloat16 worker
            await b.turns("m1", [3])
            if rebalance:
                b.pipeline.cache.revoke({0})        # ... and back
                a.pipeline.cache.assign({0})
            await a.turns("m1", [4])
            letters = b.emitter.dead_letters() + a.emitter.dead_letters()
            assert letters, "the bfloat16 worker read a float32 memory it was not allowed to"
            # the repair: the bfloat16 worker is gone (or reconfigured); the operator replays
            # every dead letter unchanged, in the order they were written
            for d in letters:
                await a.feed((d.original_key().decode(), d.original_value()))
            embedded = {e.seq for h in (a, b) for e in h.emitter.embeddings() if e.conversation_id == "m1"}
            assert embedded == {0, 1, 2, 3, 4}, f"turns never embedded: {sorted({0, 1, 2, 3, 4} - embedded)}"
            got = (await a.store.load("m1")).state
            want = compute_expected({"m1": [turn_input("m1", s) for s in range(5)]}).states["m1"]
            assert state_difference(got, want, TOL) is None
        finally:
            await a.close()
            await b.close()

    run(go())
