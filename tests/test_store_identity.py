"""The store's identity and watermarks (stream/state/epoch.py, issue #17), in-process over the
session's real Redis: a new namespace gets an identity, a restart keeps it, an emptied or
rolled-back store holds the batch until an operator decides, and a worker refuses a store of
another model or precision unless told to adopt it (the rolling deploy loses no turn).

"Emptied" here deletes every key of the test's namespace (the session's Redis is shared, so
no FLUSHALL: tests/test_store_loss.py and the chaos suite do that on a Redis of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
import redis
import torch

from schemas.events import MemoryOrigin
from stream.state.epoch import Decision, StoreMismatch, new_identity, wm_field
from tests.support.oracle import offline_engine
from tests.support.pipeline_harness import TURNS, Harness, run, turn_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def ns() -> str:
    return f"id{uuid.uuid4().hex[:8]}"


@pytest.fixture
def r(redis_url: str):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def empty_namespace(r: redis.Redis, ns: str) -> int:
    keys = list(r.scan_iter(f"{ns}:*", count=1000))
    return r.delete(*keys) if keys else 0


async def opened(redis_url: str, ns: str, committed=None, **kw) -> Harness:
    h = Harness(redis_url, ns, **kw)
    h.store.epoch.required = True
    await h.store.open_identity(committed or {}, adopt_dtype=kw.get("store_dtype_join") == "adopt")
    return h


async def still_running(task: asyncio.Task, seconds: float = 1.5) -> bool:
    await asyncio.sleep(seconds)
    return not task.done()


def test_a_new_namespace_gets_an_identity_and_a_restart_keeps_it(redis_url: str, ns: str) -> None:
    async def go() -> None:
        a = await opened(redis_url, ns)
        first = a.store.epoch.known
        assert first is not None and first.fingerprint == a.engine.fingerprint and first.dtype == "float32"
        await a.turns("c1", [0, 1])
        await a.close()
        b = await opened(redis_url, ns, committed={(TURNS, 0): 3})
        try:
            assert b.store.epoch.known.id == first.id and b.store.epoch.kind is None
        finally:
            await b.close()

    run(go())


def test_no_identity_but_acknowledged_offsets_means_the_store_was_emptied(redis_url: str, ns: str) -> None:
    async def go() -> None:
        h = await opened(redis_url, ns, committed={(TURNS, 0): 12})
        try:
            assert h.store.epoch.kind == "lost" and "emptied" in h.store.epoch.problem
            task = asyncio.create_task(h.turns("c1", [6]))
            assert await still_running(task), "a batch was processed on a store that lost its data"
            assert not h.emitter.embeddings() and h.pipeline.paused
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await h.close()

    run(go())


def test_emptied_store_holds_the_batch_until_the_loss_is_accepted(redis_url: str, ns: str, r: redis.Redis) -> None:
    """Cached and uncached conversations alike: nothing is embedded on the emptied store;
    `accept-loss` (a new identity with the decision) lets the batch through, and a
    conversation that had turns before says `reset_by_operator`, never `new`."""

    async def go() -> None:
        h = await opened(redis_url, ns)
        try:
            await h.turns("cached", [0, 1, 2])
            await h.turns("uncached", [0, 1, 2])
            h.pipeline.cache.discard(next(k for k in list(h.pipeline.cache._entries) if k.conversation_id == "uncached"))
            assert empty_namespace(r, ns) > 0
            h.emitter.clear()
            task = asyncio.create_task(h.feed(("cached", turn_value("cached", 3)), ("uncached", turn_value("uncached", 3)),
                                              ("fresh", turn_value("fresh", 0))))
            assert await still_running(task)
            assert not h.emitter.embeddings(), [(e.conversation_id, e.seq, e.memory) for e in h.emitter.embeddings()]
            assert h.store.epoch.kind == "lost" and h.pipeline.guard.reason == "lost"
            assert h.metric("evostream_store_unavailable_total") >= 1

            # the operator's decision: `evostream store accept-loss` writes a decided identity
            epoch = h.store.epoch.epoch
            ok, _ = await epoch.write(new_identity(fingerprint=h.engine.fingerprint, dtype="float32",
                                                  created_by="operator", decision=Decision.ACCEPT_LOSS), expect=None)
            assert ok
            await asyncio.wait_for(task, 30)
            got = {e.conversation_id: e.memory for e in h.emitter.embeddings()}
            assert got == {"cached": MemoryOrigin.RESET_BY_OPERATOR, "uncached": MemoryOrigin.RESET_BY_OPERATOR,
                           "fresh": MemoryOrigin.NEW}, got
            assert h.store.epoch.kind is None and not h.pipeline.paused
        finally:
            await h.close()

    run(go())


def test_a_store_behind_what_was_acknowledged_holds_until_it_catches_up(redis_url: str, ns: str,
                                                                      r: redis.Redis) -> None:
    """An old snapshot restored: its watermark is below what this worker acknowledged. The
    worker holds; once the store is brought forward (here: the watermark, as a catch-up
    rebuild into the namespace does) it resumes by itself, with its caches dropped."""

    async def go() -> None:
        h = await opened(redis_url, ns)
        try:
            offs = await h.turns("c1", [0, 1, 2])
            key = h.store.epoch.epoch.key
            assert int(r.hget(key, wm_field((TURNS, 0)))) == offs[-1]
            r.hset(key, wm_field((TURNS, 0)), offs[0])  # the snapshot's watermark
            task = asyncio.create_task(h.turns("c1", [3]))
            assert await still_running(task)
            assert h.store.epoch.kind == "lost" and "behind" in h.store.epoch.problem
            assert not h.emitter.embeddings() or max(e.seq for e in h.emitter.embeddings()) == 2
            r.hset(key, wm_field((TURNS, 0)), offs[-1])
            await asyncio.wait_for(task, 30)
            assert max(e.seq for e in h.emitter.embeddings()) == 3
        finally:
            await h.close()

    run(go())


def bf16_engine():
    from workers.engine import load_engine
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    return load_engine(cached_tiny_checkpoint("qwen3", "tiny"), dtype="bfloat16")


@pytest.fixture(scope="module")
def bf16():
    return bf16_engine()


def test_a_worker_refuses_a_store_of_another_precision_or_model(redis_url: str, ns: str, bf16) -> None:
    async def go() -> None:
        a = await opened(redis_url, ns)  # float32 store
        await a.close()
        with pytest.raises(StoreMismatch, match="EVOSTREAM_STORE_DTYPE_JOIN=adopt"):
            await opened(redis_url, ns, engine=bf16)
        b = await opened(redis_url, ns, engine=bf16, store_dtype_join="adopt")
        assert b.store.codec.storage_dtype == torch.float32 and b.store.codec.dtype == torch.bfloat16
        await b.close()

        other = offline_engine()
        foreign = Harness(redis_url, ns, engine=other)
        foreign.store.codec.fingerprint = "another-model"
        foreign.store.epoch.fingerprint = "another-model"
        with pytest.raises(StoreMismatch, match="blue-green"):
            await foreign.store.open_identity({}, adopt_dtype=True)
        await foreign.close()

    run(go())


@pytest.mark.parametrize("store_dtype", ["float32", "bfloat16"])
def test_rolling_deploy_of_mixed_precision_workers_loses_no_turn(redis_url: str, ns: str, bf16,
                                                                 store_dtype: str) -> None:
    """A float32 fleet and a bfloat16 fleet share the group while the deploy rolls; the one
    that joins adopts the store's dtype, partitions move back and forth (caches dropped as a
    rebalance does): every turn is embedded once, no dead letter, every memory whole and in
    the store's dtype."""

    async def go() -> None:
        fp32 = offline_engine()
        first, second = (fp32, bf16) if store_dtype == "float32" else (bf16, fp32)
        a = await opened(redis_url, ns, engine=first)
        b = await opened(redis_url, ns, engine=second, store_dtype_join="adopt")
        try:
            cids = ["r0", "r1", "r2"]
            owner = [a, b]
            for seq in range(8):
                h = owner[seq % 2]
                for other in owner:
                    other.pipeline.cache.revoke({0})
                h.pipeline.cache.assign({0})
                await h.feed(*[(c, turn_value(c, seq)) for c in cids])
            embedded = sorted((e.conversation_id, e.seq) for h in owner for e in h.emitter.embeddings())
            assert embedded == sorted((c, s) for c in cids for s in range(8))
            assert not a.emitter.dead_letters() and not b.emitter.dead_letters()
            for c in cids:
                raw = await a.store.redis.get(a.store.keys(c).base)
                got = await a.store.load(c)
                assert got is not None and got.seq == 7
                from workers.state import stored_dtype

                deltas = await a.store.redis.lrange(a.store.keys(c).deltas, 0, -1)
                assert {str(stored_dtype(x)).removeprefix("torch.") for x in [raw, *deltas] if x} == {store_dtype}
        finally:
            await a.close()
            await b.close()

    run(go())
