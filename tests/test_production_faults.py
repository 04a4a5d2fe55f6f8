"""Faults a real deployment brings (issue #7), at the level of one pipeline over a REAL Redis.

Each test reproduces a failure that the pipeline of 2026-11-24 had (a key evicted on its own,
a delete racing a paused writer, two tenants with one conversation id, silent expiry, an
unbounded gap policy, a revoked partition's state re-entering the cache, a hash tag split by
`}`), then checks the behaviour that replaced it. The model is the real tiny checkpoint and
Redis is the session's real server; the only stand-in is the emitter, which records what the
pipeline would produce (these tests are about the checkpoint logic; the end-to-end tests and
the chaos suite cover the same faults through the real broker).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from schemas.events import DeadLetterReason, EmbeddingEvent, MemoryOrigin
from schemas.turns import ChatMessage, TurnInput
from schemas.vectors import decode_vector
from stream.state.errors import UnsafeRedisConfig
from stream.state.store import MemoryStore
from stream.identity import ConversationRef
from stream.runtime.metrics import Metrics
from stream.processing.pipeline import TurnPipeline
from stream.processing.records import InboundRecord
from stream.settings import GapPolicy, Settings
from stream.state.cache import StateCache
from tests.support.oracle import TOL, compute_expected, offline_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from tests.support.pipeline_harness import DLT, EMB, TURNS, RecordingEmitter  # noqa: E402


def text(cid: str, seq: int) -> tuple[str, str]:
    return (f"{cid} asks question number {seq} about the river and the stone",
            f"answer {seq}: the window faces the garden in the morning")


def turn_value(cid: str, seq: int, tenant: str | None = None) -> bytes:
    u, a = text(cid, seq)
    ev = {"type": "turn", "conversation_id": cid, "seq": seq, "timestamp": "2026-11-30T12:00:00Z",
          "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
    if tenant is not None:
        ev["tenant"] = tenant
    import json

    return json.dumps(ev).encode()


def delete_value(cid: str, tenant: str | None = None) -> bytes:
    import json

    ev = {"type": "delete", "conversation_id": cid, "timestamp": "2026-11-30T12:00:00Z"}
    if tenant is not None:
        ev["tenant"] = tenant
    return json.dumps(ev).encode()


def turn_input(cid: str, seq: int) -> TurnInput:
    u, a = text(cid, seq)
    return TurnInput(conversation_id=cid, seq=seq,
                     messages=[ChatMessage(role="user", content=u), ChatMessage(role="assistant", content=a)])


class Harness:
    """One pipeline (one 'worker') over the real Redis and the real tiny engine."""

    _offset = 0

    def __init__(self, redis_url: str, namespace: str, engine_step_hook=None, **settings) -> None:
        self.engine = offline_engine()
        self.settings = Settings(redis_url=redis_url, redis_namespace=namespace, turns_topic=TURNS,
                                 embeddings_topic=EMB, dead_letter_topic=DLT, compact_every=4,
                                 worker_id=f"h-{uuid.uuid4().hex[:6]}", **settings)
        s = self.settings
        self.store = MemoryStore(redis_url, fingerprint=self.engine.fingerprint,
                                     hidden_size=self.engine.hidden_size, capacity=self.engine.capacity,
                                     dtype=self.engine.state_dtype, namespace=namespace, ttl_s=s.state_ttl_s,
                                     marker_ttl_s=s.marker_ttl_s, compact_every=s.compact_every,
                                     writer_id=s.worker_id, durability=s.redis_durability,
                                     durability_replicas=s.redis_durability_replicas)
        self.emitter = RecordingEmitter()
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.metrics = Metrics()
        engine = self.engine if engine_step_hook is None else _HookedEngine(self.engine, engine_step_hook)
        self.pipeline = TurnPipeline(engine, self.store, self.emitter, s, self.executor, self.metrics,
                                     cache=StateCache(s.cache_max_bytes))

    async def feed(self, *values: tuple[str, bytes], partition: int = 0, offset: int | None = None) -> list[int]:
        """Process the records as one batch; returns their offsets (`offset`: replay at a
        given position instead of the next one)."""
        recs = []
        for key, value in values:
            if offset is None:
                Harness._offset += 1
            recs.append(InboundRecord(TURNS, partition, offset if offset is not None else Harness._offset,
                                      key.encode(), value, int(datetime.now(UTC).timestamp() * 1000)))
        await self.pipeline.process(recs)
        return [r.offset for r in recs]

    async def turns(self, cid: str, seqs, tenant: str | None = None, partition: int = 0) -> None:
        await self.feed(*[(cid, turn_value(cid, s, tenant)) for s in seqs], partition=partition)

    async def close(self) -> None:
        await self.store.close()
        self.executor.shutdown(wait=False)

    def metric(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels or None)
        return v or 0.0


class _HookedEngine:
    """The real engine, with a callback run inside the model step (to pause or to revoke)."""

    def __init__(self, engine, hook) -> None:
        self._engine, self._hook = engine, hook

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self, states, turns):
        out = self._engine.step(states, turns)
        self._hook(turns)
        return out


@pytest.fixture
def ns() -> str:
    return f"pf{uuid.uuid4().hex[:8]}"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def run(coro):
    return asyncio.run(coro)


def vec(ev: EmbeddingEvent) -> np.ndarray:
    return decode_vector(ev.vector)


# ------------------------------------------------------------------ 1. one key evicted


@pytest.mark.parametrize("evicted", ["base", "deltas", "meta"])
def test_one_evicted_key_quarantines_that_conversation_only(redis_url: str, ns: str, r: redis.Redis,
                                                            evicted: str) -> None:
    """A `volatile-*` policy evicts one key of a conversation. Before: a missing base
    continued a silently truncated memory; missing deltas made the worker exit 70 again and
    again (the whole partition stopped). Now: that conversation's turns are dead-lettered
    `checkpoint_corrupt`, every other conversation on the partition flows on."""

    async def go() -> None:
        h = Harness(redis_url, ns)
        try:
            for cid in ("victim", "control"):
                await h.turns(cid, range(5))  # 5 deltas > compact_every=4: written as a base
                await h.turns(cid, [5])  # appended as a delta
            h.pipeline.cache.clear()  # a restarted / new owner reads Redis
            keys = h.store.keys("victim")
            assert r.exists(keys.base) and r.exists(keys.deltas)  # compact_every=4: base + 1 delta
            r.delete(getattr(keys, evicted))
            h.emitter.clear()
            await h.feed(("victim", turn_value("victim", 6)), ("control", turn_value("control", 6)))
            embs = h.emitter.embeddings()
            assert [(e.conversation_id, e.seq) for e in embs] == [("control", 6)]
            (dl,) = h.emitter.dead_letters()
            assert dl.reason_code is DeadLetterReason.CHECKPOINT_CORRUPT and "victim" in dl.reason
            assert dl.original_value() == turn_value("victim", 6)
            assert h.metric("evostream_quarantined_turns_total", reason="checkpoint_corrupt") == 1
            exp = compute_expected({"control": [turn_input("control", s) for s in range(7)]})
            assert np.abs(vec(embs[0]) - exp.embeddings[("control", 6)]).max() < TOL
            info = await h.store.inspect("victim")
            assert info is not None and info["whole"] is False and info["problem"]
            # the operator resets it; its next turn starts a new memory and says so
            await h.store.reset("victim")
            h.emitter.clear()
            await h.feed(("victim", turn_value("victim", 7)))
            (e,) = h.emitter.embeddings()
            assert (e.seq, e.memory, e.generation, e.memory_len) == (7, MemoryOrigin.RESET_BY_OPERATOR, 2, 0)
            assert (await h.store.inspect("victim"))["whole"] is True
        finally:
            await h.close()

    run(go())


def test_a_cached_writer_never_extends_a_chain_that_lost_a_piece(redis_url: str, ns: str, r: redis.Redis) -> None:
    """The owner still holds the state in its cache when a key is evicted: appending its next
    delta would leave a checkpoint that can never load again. The commit refuses (the turn is
    dead-lettered, the conversation quarantined) instead of writing past the hole."""

    async def go() -> None:
        h = Harness(redis_url, ns)
        try:
            await h.turns("c", range(5))
            await h.turns("c", [5])
            r.delete(h.store.keys("c").deltas)
            h.emitter.clear()
            await h.turns("c", [6])  # cache hit, append mode
            assert h.emitter.embeddings() == []
            (dl,) = h.emitter.dead_letters()
            assert dl.reason_code is DeadLetterReason.CHECKPOINT_CORRUPT
            assert (await h.store.inspect("c"))["whole"] is False
        finally:
            await h.close()

    run(go())


def test_evicted_outbox_loses_nothing(redis_url: str, ns: str, r: redis.Redis) -> None:
    """The outbox only holds already-committed events until the broker confirmed them: losing
    it costs at most a re-emit, never a turn."""

    async def go() -> None:
        h = Harness(redis_url, ns)
        try:
            await h.turns("c", range(3))
            h.pipeline.cache.clear()
            r.delete(h.store.keys("c").outbox)
            h.emitter.clear()
            await h.turns("c", [3])
            (e,) = h.emitter.embeddings()
            assert e.seq == 3 and e.memory is MemoryOrigin.CONTINUED and not h.emitter.dead_letters()
        finally:
            await h.close()

    run(go())


# ------------------------------------------------------------------ 2. delete vs a paused writer


def test_delete_racing_a_paused_writer_never_resurrects(redis_url: str, ns: str, r: redis.Redis) -> None:
    """Worker A is paused inside the model step; B takes over, applies the turn, then the
    delete. Before: A's commit expecting "no state" succeeded (a delete was a plain DEL), so
    Redis held the deleted conversation again and the topic carried embedding, tombstone,
    embedding. Now: the tombstone refuses A's commit; A re-reads, sees the turn deleted and
    emits nothing."""
    in_step, release = threading.Event(), threading.Event()

    def pause(_turns) -> None:
        in_step.set()
        assert release.wait(60)

    async def go() -> None:
        a = Harness(redis_url, ns, engine_step_hook=pause)
        b = Harness(redis_url, ns)
        try:
            task = asyncio.create_task(a.turns("gone", [0]))
            while not in_step.is_set():
                await asyncio.sleep(0.01)
            (turn_at,) = await b.feed(("gone", turn_value("gone", 0)))
            (delete_at,) = await b.feed(("gone", delete_value("gone")))
            assert [t.deleted_through_seq for t in b.emitter.tombstones()] == [0]
            release.set()
            await task
            assert a.emitter.embeddings() == []  # nothing after the tombstone
            keys = a.store.keys("gone")
            assert r.exists(keys.meta, keys.base, keys.deltas, keys.outbox) == 0
            assert r.hget(keys.mark, "status") == b"deleted"
            assert a.metric("evostream_checkpoint_conflicts_total") >= 1
            # a replay of the deleted turn (its old position, before the delete) is dropped
            await b.feed(("gone", turn_value("gone", 0)), offset=turn_at)
            assert len(b.emitter.embeddings()) == 1 and b.metric("evostream_turns_after_delete_total") == 1
            # a turn published after the delete starts a new conversation under the old id,
            # even if its producer restarts the seqs
            await b.turns("gone", [0])
            e = b.emitter.embeddings()[-1]
            assert (e.seq, e.memory, e.generation, e.memory_len) == (0, MemoryOrigin.RESET_AFTER_DELETE, 2, 0)
            await b.turns("gone", [1])
            assert b.emitter.embeddings()[-1].memory is MemoryOrigin.CONTINUED
            # a replay of the old delete (before the new generation began) leaves it alone,
            # and so does a replay of the deleted generation's turn
            await b.feed(("gone", delete_value("gone")), offset=delete_at)
            b.pipeline.cache.clear()
            await b.feed(("gone", turn_value("gone", 0)), offset=turn_at)
            assert len(b.emitter.tombstones()) == 1
            now = await b.store.load("gone")
            assert now is not None and (now.gen, now.seq) == (2, 1)
        finally:
            release.set()
            await a.close()
            await b.close()

    run(go())


# ------------------------------------------------------------------ 3. tenants


def test_two_tenants_with_one_conversation_id_never_share_memory(redis_url: str, ns: str) -> None:
    """Before: tenant B's seq 0 was dropped as a duplicate of tenant A's, and B's seq 1 was
    embedded on A's memory. Now (tenant, conversation id) is the identity everywhere."""

    async def go() -> None:
        h = Harness(redis_url, ns)
        try:
            await h.turns("shared", [0], tenant="acme")
            h.pipeline.cache.clear()
            await h.feed(("shared", turn_value("shared", 0, "globex")), ("shared", turn_value("shared", 1, "globex")))
            embs = h.emitter.embeddings()
            assert [(e.tenant, e.seq) for e in embs] == [("acme", 0), ("globex", 0), ("globex", 1)]
            assert h.metric("evostream_turns_duplicate_total") == 0
            exp = compute_expected({"shared": [turn_input("shared", s) for s in range(2)]})
            for e in embs[1:]:  # globex's conversation alone, as if acme did not exist
                assert np.abs(vec(e) - exp.embeddings[("shared", e.seq)]).max() < TOL
            assert embs[2].memory_len == exp.memory_lens[("shared", 1)]
            a = await h.store.load(ConversationRef("acme", "shared"))
            g = await h.store.load(ConversationRef("globex", "shared"))
            n = await h.store.load(ConversationRef(None, "shared"))
            assert (a.seq, g.seq, n) == (0, 1, None)
            # a delete of one tenant's conversation leaves the other's alone
            await h.feed(("shared", delete_value("shared", "acme")))
            assert await h.store.load(ConversationRef("acme", "shared")) is None
            assert (await h.store.load(ConversationRef("globex", "shared"))).seq == 1
        finally:
            await h.close()

    run(go())


def test_stored_identity_mismatch_is_dead_lettered(redis_url: str, ns: str, r: redis.Redis) -> None:
    """A checkpoint whose meta names another identity (a key copied by hand, a restore into
    the wrong namespace) is never continued: `tenant_mismatch`."""

    async def go() -> None:
        h = Harness(redis_url, ns)
        try:
            await h.turns("c", [0], tenant="acme")
            src = h.store.keys(ConversationRef("acme", "c"))
            dst = h.store.keys(ConversationRef("globex", "c"))
            for s_key, d_key in zip(src, dst):
                if r.exists(s_key):
                    r.copy(s_key, d_key)
            h.pipeline.cache.clear()
            await h.turns("c", [1], tenant="globex")
            (dl,) = h.emitter.dead_letters()
            assert dl.reason_code is DeadLetterReason.TENANT_MISMATCH
        finally:
            await h.close()

    run(go())


# ------------------------------------------------------------------ 4. expiry, gaps


def test_expiry_is_visible_and_not_a_gap(redis_url: str, ns: str, r: redis.Redis) -> None:
    """Before: after STATE_TTL_S the next turn silently started from an empty memory, and with
    GAP_POLICY=dead_letter every later turn was dead-lettered forever. Now the event says
    `reset_after_expiry`, a metric counts it, and the marker tells expiry from a gap."""

    async def go() -> None:
        h = Harness(redis_url, ns, state_ttl_s=1, gap_policy=GapPolicy.DEAD_LETTER)
        try:
            await h.turns("idle", range(3))
            await asyncio.sleep(1.3)
            h.pipeline.cache.clear()
            assert r.exists(*h.store.keys("idle")[:4]) == 0
            h.emitter.clear()
            await h.turns("idle", [3, 4])
            e3, e4 = h.emitter.embeddings()
            assert (e3.memory, e3.generation, e3.memory_len) == (MemoryOrigin.RESET_AFTER_EXPIRY, 2, 0)
            assert e4.memory is MemoryOrigin.CONTINUED and e4.memory_len > 0
            assert not h.emitter.dead_letters()
            assert h.metric("evostream_embeddings_by_memory_total", memory="reset_after_expiry") == 1
            await h.turns("brand-new", [0])
            assert h.emitter.embeddings()[-1].memory is MemoryOrigin.NEW
        finally:
            await h.close()

    run(go())


def test_gap_dead_letter_policy_is_bounded(redis_url: str, ns: str) -> None:
    """Before: one lost turn dead-lettered every later turn of the conversation forever."""

    async def go() -> None:
        h = Harness(redis_url, ns, gap_policy=GapPolicy.DEAD_LETTER, gap_max_dead_letters=2)
        try:
            await h.turns("holey", [0])
            await h.turns("holey", [2])
            await h.turns("holey", [3])
            assert [d.reason_code for d in h.emitter.dead_letters()] == [DeadLetterReason.SEQ_GAP] * 2
            await h.turns("holey", [4])  # third gapped turn: continues without turn 1
            await h.turns("holey", [5])
            assert [e.seq for e in h.emitter.embeddings()] == [0, 4, 5]
            assert h.metric("evostream_seq_gaps_rebased_total") == 1
            await h.turns("holey", [7])  # a new gap gets its own allowance
            assert h.emitter.dead_letters()[-1].original_value() == turn_value("holey", 7)
        finally:
            await h.close()

    run(go())


# ------------------------------------------------------------------ 6. cache after revoke; slots


def test_revoked_partition_state_never_reenters_the_cache(redis_url: str, ns: str) -> None:
    """Before: a batch in flight when its partition was revoked put its states back into the
    cache afterwards, and queries read that stale copy while the new owner advanced it."""
    holder: dict[str, Harness] = {}

    def revoke(_turns) -> None:
        holder["h"].pipeline.cache.revoke({3})

    async def go() -> None:
        h = holder["h"] = Harness(redis_url, ns, engine_step_hook=revoke)
        try:
            h.pipeline.cache.assign({3})
            await h.turns("moving", [0], partition=3)
            assert ConversationRef(None, "moving") not in h.pipeline.cache
            assert h.pipeline.cache.refused == 1
            assert len(h.emitter.embeddings()) == 1  # the batch itself completed
        finally:
            await h.close()

    run(go())


@pytest.mark.parametrize("cid", ["a}b", "{x}", "}", "plain", "ünï{cøde}"])
def test_all_keys_of_a_conversation_share_one_cluster_slot(cid: str) -> None:
    """Before: the hash tag was the raw id, so an id containing `}` put its keys in
    different slots (every multi-key script then fails on Redis Cluster)."""
    from stream.state.keys import conversation_keys

    for tenant in (None, "acme", "t}x"):
        keys = conversation_keys("evostream", ConversationRef(tenant, cid))
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys


# ------------------------------------------------------------------ a failing model step


def test_a_turn_the_model_fails_on_is_dead_lettered_and_the_rest_applies(redis_url: str, ns: str) -> None:
    """processing_error: the batch is retried turn by turn; only the failing turn (and any
    later turn of its conversation in the batch) is dead-lettered."""

    def boom(turns) -> None:
        if any("EXPLODE" in m.content for t in turns for m in t.messages):
            raise RuntimeError("the model step failed on purpose")

    async def go() -> None:
        h = Harness(redis_url, ns, engine_step_hook=boom)
        try:
            import json

            bad = json.loads(turn_value("bad", 0))
            bad["messages"][0]["content"] = "EXPLODE now"
            await h.feed(("ok", turn_value("ok", 0)), ("bad", json.dumps(bad).encode()), ("ok", turn_value("ok", 1)))
            assert [(e.conversation_id, e.seq) for e in h.emitter.embeddings()] == [("ok", 0), ("ok", 1)]
            (dl,) = h.emitter.dead_letters()
            assert dl.reason_code is DeadLetterReason.PROCESSING_ERROR and "on purpose" in dl.reason
            exp = compute_expected({"ok": [turn_input("ok", s) for s in range(2)]})
            assert np.abs(vec(h.emitter.embeddings()[1]) - exp.embeddings[("ok", 1)]).max() < TOL
        finally:
            await h.close()

    run(go())


# ------------------------------------------------------------------ eviction policy


def test_start_refuses_a_redis_that_may_evict(redis_url: str, r: redis.Redis) -> None:
    engine = offline_engine()

    async def go() -> None:
        store = MemoryStore(redis_url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
                                capacity=engine.capacity, dtype=engine.state_dtype)
        try:
            assert (await store.server.check_server())["maxmemory_policy"] == "noeviction"
            r.config_set("maxmemory-policy", "volatile-lru")
            with pytest.raises(UnsafeRedisConfig, match="volatile-lru.*noeviction"):
                await store.server.check_server()
            await store.server.check_server(allow_eviction=True)  # the documented override
        finally:
            r.config_set("maxmemory-policy", "noeviction")
            await store.close()

    run(go())
