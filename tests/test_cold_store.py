"""The cold tier's files (issue #22 / #17 item 2): shards by hash with a manifest, a bad file
quarantined alone and retried, the layout before sharding still read, freezing in parallel and by
shard range. Real SQLite files; the Redis side runs against the real valkey of the test session."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch

from stream.cli.cold_tier import parse_shards
from stream.cli.errors import CliError
from stream.identity import ConversationRef
from stream.state.cold_store import _SCHEMA, MANIFEST, ColdRecord, ColdStore, ShardUnreadable, shard_of
from stream.state.cold_tier import ColdTier
from schemas.events import DeadLetterReason
from stream.state.records import MemoryProblem, TurnCommit
from stream.state.store import MemoryStore
from workers.state import ConversationState, StateDelta


def _rec(tag: str) -> ColdRecord:
    return ColdRecord(tag, None, f"cid-{tag}", 1, 3, [b"seq", b"3"], b"base-" + tag.encode(), [b"d1", b"d2"], [])


def _tags(n: int) -> list[str]:
    return [ConversationRef(None, f"c{i}").tag for i in range(n)]


def test_records_spread_over_shards_and_the_manifest_keeps_the_count(tmp_path: Path) -> None:
    store = ColdStore(tmp_path / "cold", shards=8)
    tags = _tags(64)
    for index, group in store.by_shard(tags).items():
        ColdStore.put(store.shards[index], [_rec(t) for t in group])
    assert store.count() == 64
    assert len({shard_of(t, 8) for t in tags}) == 8          # every shard got some
    assert json.loads((tmp_path / "cold" / MANIFEST).read_text())["shards"] == 8
    store.close()
    again = ColdStore(tmp_path / "cold", shards=32)            # a different setting never re-homes rows
    assert len(again.shards) == 8 and again.count() == 64
    got = ColdStore.get(again.shard(tags[5]), [tags[5]])[tags[5]]
    assert got == _rec(tags[5])
    again.close()


def test_a_corrupt_shard_is_quarantined_alone_and_retried_after_repair(tmp_path: Path) -> None:
    store = ColdStore(tmp_path / "cold", shards=4, retry_s=0.2)
    tags = _tags(32)
    for index, group in store.by_shard(tags).items():
        ColdStore.put(store.shards[index], [_rec(t) for t in group])
    victim = store.shard(tags[0])
    victim.close()  # the last connection folds the WAL into the file: a backup of it is complete
    good = bytes(victim.path.read_bytes())
    for p in victim.path.parent.glob(victim.path.name + "-*"):
        p.unlink()
    victim.path.write_bytes(b"overwritten by hand " * 300)
    with pytest.raises(ShardUnreadable, match="unreadable.*quarantined"):
        ColdStore.get(victim, [tags[0]])
    assert victim.index in store.quarantined() and str(victim.path) in store.quarantined()[victim.index]
    others = [t for t in tags if shard_of(t, 4) != victim.index]
    assert store.count() == len(others)                         # the other shards answer
    assert ColdStore.get(store.shard(others[0]), [others[0]])
    victim.path.write_bytes(good)                               # restored from a backup
    asyncio.run(asyncio.sleep(0.25))
    assert ColdStore.get(victim, [tags[0]])[tags[0]] == _rec(tags[0])
    assert not store.quarantined()
    store.close()


def test_an_existing_single_file_is_read_as_one_shard(tmp_path: Path) -> None:
    legacy = tmp_path / "cold.sqlite"  # the layout before sharding: one SQLite file
    db = sqlite3.connect(legacy)
    db.executescript(_SCHEMA)
    db.close()
    store = ColdStore(legacy, shards=16)
    assert len(store.shards) == 1 and store.shards[0].path == legacy
    ColdStore.put(store.shards[0], [_rec("t1")])
    assert store.count() == 1 and ColdStore.get(store.shards[0], ["t1"])["t1"] == _rec("t1")
    store.close()


def test_shard_ranges_for_parallel_freezers() -> None:
    assert parse_shards("0-3,7", 8) == {0, 1, 2, 3, 7}
    assert parse_shards(None, 8) is None
    for bad in ("9", "x-2", "3-12"):
        with pytest.raises(CliError):
            parse_shards(bad, 8)


async def _seed(store: MemoryStore, refs: list[ConversationRef], turns: int = 3) -> None:
    await store.prepare()
    for i, ref in enumerate(refs):
        st = ConversationState(hidden_size=8, capacity=32)
        gen = torch.Generator().manual_seed(i)
        for k in range(turns):
            start = st.seq
            d = StateDelta(seq=k, new_segment=k == 0, token_ids=[1, 2, 3], latents=torch.randn(4, 8, generator=gen))
            st.apply(d)
            res = (await store.commit([TurnCommit(ref, start, st, [d], {}, expected_gen=1, fresh=k == 0)]))[0]
            assert res.applied, res


def test_freezers_split_by_shard_and_a_quarantined_shard_keeps_its_conversations_in_redis(
        redis_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        cold = ColdTier(tmp_path / "cold", shards=4)
        ns = f"cs{os.getpid()}{id(cold) % 10000}"
        store = MemoryStore(redis_url, fingerprint="t", hidden_size=8, capacity=32, dtype=torch.float32,
                                namespace=ns, cold=cold)
        refs = [ConversationRef("acme", f"c{i}") for i in range(24)]
        try:
            await _seed(store, refs)
            halves = [{0, 1}, {2, 3}]
            reps = await asyncio.gather(*(cold.freeze_idle(store, 0, batch=4, concurrency=3, only_shards=h)
                                          for h in halves))
            assert sum(r.frozen for r in reps) == 24 and cold.count() == 24
            for rep, half in zip(reps, halves):
                assert rep.frozen == sum(shard_of(r.tag, 4) in half for r in refs)
            # break one shard, then thaw everything: its conversations stay cold and say why
            victim = cold.files.shards[0]
            victim.close()
            victim.path.write_bytes(b"garbage " * 500)
            got = await store.load_many(refs)
            for ref in refs:
                if shard_of(ref.tag, 4) == 0:
                    assert isinstance(got[ref], MemoryProblem), got[ref]
                    assert got[ref].code is DeadLetterReason.CHECKPOINT_CORRUPT
                    assert "unreadable" in got[ref].detail and str(victim.path) in got[ref].detail
                else:
                    assert got[ref].live
            assert all((cold.why_missing(r) is not None) == (shard_of(r.tag, 4) == 0) for r in refs)
        finally:
            await store.close()
            cold.close()

    asyncio.run(go())


def test_a_conversation_idle_exactly_idle_s_is_frozen(redis_url: str, tmp_path: Path, monkeypatch) -> None:
    """`freeze --idle-s N` freezes what has been idle for at least N seconds. With N = 0 the
    conversation committed a moment ago qualifies even when the freeze starts within the same
    millisecond as that commit (Redis stamps `updated_at_ms` by its own TIME): the strict
    comparison left it in Redis, one in 24 now and then under a full test run."""
    import redis as redis_sync

    from stream.state import cold_tier

    async def go() -> None:
        cold = ColdTier(tmp_path / "cold", shards=2)
        ns = f"ce{os.getpid()}{id(cold) % 10000}"
        store = MemoryStore(redis_url, fingerprint="t", hidden_size=8, capacity=32, dtype=torch.float32,
                            namespace=ns, cold=cold)
        ref = ConversationRef("acme", "same-ms")
        try:
            await _seed(store, [ref], turns=1)
            r = redis_sync.Redis.from_url(redis_url)
            try:
                stamp = int(r.hget(store.keys(ref).meta, "updated_at_ms"))
            finally:
                r.close()
            # the freeze's clock reads exactly the commit's millisecond
            monkeypatch.setattr(cold_tier.time, "time", lambda: (stamp + 0.5) / 1000)
            rep = await cold.freeze_idle(store, 0)
            assert rep.frozen == 1 and cold.count() == 1, rep
        finally:
            monkeypatch.undo()
            await store.close()

    asyncio.run(go())
