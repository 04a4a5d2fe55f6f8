"""Issue #17 item 3: late and corrected turns are never silent.

Before: with GAP_POLICY=apply, seq 5 was applied after seq 2 (a gap warning); when seqs 3 and 4
arrived later, and when seq 2 was re-sent with different content, all three were dropped as
duplicates: no dead letter, no log line, only `turns_duplicate_total`.

The policy (README "Late and corrected turns"): a turn of a seq that was skipped is
dead-lettered `late_turn`; a re-sent seq whose messages differ from the applied one is
dead-lettered `conflicting_duplicate`; a re-sent seq with the same messages is a plain
duplicate (its event re-emitted from the outbox while it is there). Each has its metric and
a log line. The dead letters carry the original bytes; memory is never rewound.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from tests.support.pipeline_harness import Harness, run, turn_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def ns() -> str:
    return f"late{uuid.uuid4().hex[:8]}"


def test_late_and_corrected_turns_are_dead_lettered_with_their_reason(redis_url: str, ns: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        h = Harness(redis_url, ns)
        try:
            await h.turns("c1", [0, 1, 2])
            await h.turns("c1", [5])  # gap: 3 and 4 missing, applied with a warning (GAP_POLICY=apply)
            h.emitter.clear()
            with caplog.at_level(logging.WARNING):
                await h.turns("c1", [3, 4])  # they arrive late
                await h.feed(("c1", turn_value("c1", 2, text="an edited version of the second question")))
                await h.feed(("c1", turn_value("c1", 1)))  # an exact resend: a plain duplicate
            dl = {(d.reason_code.value, d.original_value() and __import__("json").loads(d.original_value())["seq"])
                  for d in h.emitter.dead_letters()}
            assert dl == {("late_turn", 3), ("late_turn", 4), ("conflicting_duplicate", 2)}, dl
            assert h.metric("evostream_turns_late_total") == 2
            assert h.metric("evostream_turns_conflicting_total") == 1
            assert h.metric("evostream_turns_duplicate_total") == 1  # only the exact resend
            assert not h.emitter.embeddings(), "nothing was applied"
            text = caplog.text
            assert "late" in text and "conflicting" in text
        finally:
            await h.close()

    run(go())


def test_a_late_turn_is_told_apart_across_workers_and_restarts(redis_url: str, ns: str) -> None:
    """What a worker knows is in Redis, not in its memory: a restarted worker (empty cache)
    classifies the same way, also after the conversation compacted (compact_every=2)."""

    async def go() -> None:
        a = Harness(redis_url, ns, compact_every=2)
        await a.turns("c2", [0, 1, 4, 5, 6])  # 2 and 3 skipped
        await a.close()
        b = Harness(redis_url, ns, compact_every=2)
        try:
            await b.turns("c2", [3])
            await b.feed(("c2", turn_value("c2", 0, text="changed")))
            await b.turns("c2", [5])
            codes = sorted(d.reason_code.value for d in b.emitter.dead_letters())
            assert codes == ["conflicting_duplicate", "late_turn"], codes
        finally:
            await b.close()

    run(go())
