"""The query batcher and the model thread in isolation (our own scheduling logic, with the
real tiny engine): micro-batched results equal one-at-a-time ones, an ingestion step never
waits behind more than one query pass, queries keep to their share while ingestion is busy,
a full queue refuses at once. The live behaviour (HTTP, 429 under a burst, ingestion under a
flood) is tested in tests/test_api.py and measured by benchmarks/bench_query.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from stream.api.batcher import EmbedItem, QueryBatcher, rerank_pass
from stream.api.errors import ApiError
from stream.runtime.model_thread import ModelThread
from support.oracle import TOL, offline_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _states(engine, n: int):
    from schemas.turns import ChatMessage, TurnInput

    states = {}
    for c in range(n):
        cid = f"c{c}"
        turns = [TurnInput(conversation_id=cid, seq=s, messages=[ChatMessage(role="user", content=f"turn {s} of {c}")])
                 for s in range(c + 1)]
        st = {cid: engine.new_state()}
        engine.step(st, turns, embed=False)
        states[cid] = st[cid]
    return list(states.values())


def test_micro_batched_answers_equal_one_at_a_time() -> None:
    engine = offline_engine()
    states = _states(engine, 3) + [None]
    thread = ModelThread()
    batcher = QueryBatcher(engine, thread, queue_max=100, batch_max=8, batch_wait_s=0.01, share=0.2, grace_s=0.05)
    requests = [[EmbedItem(states[i % 4], f"question {i}", query=(i % 3 != 0)) for _ in range(1 + i % 3)]
                for i in range(12)]

    async def go():
        try:
            return await asyncio.gather(*(batcher.embed(r) for r in requests))
        finally:
            await batcher.stop()

    got = asyncio.run(go())
    assert batcher.passes < len(requests), "requests should have been merged into fewer passes"
    for req, vecs in zip(requests, got):
        for item, v in zip(req, vecs):
            fn = engine.embed_queries if item.query else engine.embed_texts
            want = fn([(item.state, item.text)])[0]
            assert float(np.abs(v - want).max()) <= TOL
    thread.shutdown()


def test_rerank_pass_leaves_the_state_alone() -> None:
    engine = offline_engine()
    st = _states(engine, 2)[1]
    before = st.copy()
    rerank_pass(engine, st, "q", ["a", "b"])
    assert st.equals(before)


def test_ingestion_never_waits_behind_more_than_one_query_pass_and_keeps_its_share() -> None:
    """Two query floods (passes of 16 texts) against a closed loop of 10 ms "steps" (sleeps on
    the model thread, standing in for ingestion). Without the time-share rule the thread
    alternates pass/step and queries take about as much model time as the steps or more; with
    it (share 0.2) they take about a quarter of it."""
    engine = offline_engine()
    thread = ModelThread()
    share = 0.2
    batcher = QueryBatcher(engine, thread, queue_max=10_000, batch_max=16, batch_wait_s=0, share=share, grace_s=0.1)
    state = _states(engine, 3)[2]
    waited: list[int] = []
    ledger: dict[str, float] = {}

    def step(at_submit: int) -> None:
        waited.append(thread.query_passes - at_submit)
        time.sleep(0.01)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await asyncio.gather(*(batcher.embed([EmbedItem(state, f"q{i}", True)] * 8) for i in range(8)))

        floods = [asyncio.create_task(flood()) for _ in range(2)]
        await asyncio.sleep(0.3)  # queries alone first: no ingestion, no pause
        ledger.update(q0=thread.query_busy_s, i0=thread.ingest_busy_s, p0=batcher.passes)
        for _ in range(100):  # a closed loop of steps, like the pipeline's agent
            await loop.run_in_executor(thread, step, thread.query_passes)
            await asyncio.sleep(0.002)  # the pipeline's own work between two steps
        ledger.update(q1=thread.query_busy_s, i1=thread.ingest_busy_s, p1=batcher.passes)
        stop.set()
        await asyncio.gather(*floods)
        await batcher.stop()

    asyncio.run(go())
    thread.shutdown()
    assert len(waited) == 100
    assert max(waited) <= 1, waited  # at most one query pass between a step's submit and its start
    queries, ingest = ledger["q1"] - ledger["q0"], ledger["i1"] - ledger["i0"]
    passes = ledger["p1"] - ledger["p0"]
    assert passes >= 2 and ingest >= 1.0, ledger  # both sides did run
    # model-thread time, not wall time: s / (1 - s) = 0.25 by the rule; 0.5 leaves room for the
    # first pass and timer slop, and is far below what plain alternation gives
    assert queries <= 0.5 * ingest, (queries, ingest, passes)


def test_full_queue_refuses_at_once() -> None:
    engine = offline_engine()
    thread = ModelThread()
    batcher = QueryBatcher(engine, thread, queue_max=2, batch_max=1, batch_wait_s=0.05, share=1.0, grace_s=0)

    async def go() -> list:
        tasks = [asyncio.ensure_future(batcher.embed([EmbedItem(None, f"q{i}", True)])) for i in range(6)]
        res = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return res

    res = asyncio.run(go())
    refused = [r for r in res if isinstance(r, ApiError)]
    assert refused and all(r.status == 429 and r.error_type == "overloaded" for r in refused)
    assert sum(isinstance(r, np.ndarray) for r in res) >= 2
    thread.shutdown()
