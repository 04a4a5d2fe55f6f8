"""`evostream rebuild` (stream/processing/rebuild.py, issue #17) over the session's real broker
and Redis, in-process: memories re-derived from the turns topic equal an offline replay bit for
bit (exact mode), an interrupted rebuild resumes where it stopped, scopes and the live rules
(deletes, gaps, duplicates) apply, and the default stops at what the consumer group
acknowledged. The chaos suite runs the command itself after real store faults.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import ConversationDelete, TurnEvent
from stream.processing.rebuild import Rebuild, Scope
from stream.settings import Settings
from stream.state.store import MemoryStore
from tests.support.oracle import compute_expected, offline_engine
from tests.support.traffic import BASE_TIME, encode, generate_traffic, produce

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings_for(kafka_bootstrap: str, redis_url: str, topic: str, **kw) -> Settings:
    return Settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, turns_topic=topic,
                    group_id=f"g-{uuid.uuid4().hex[:8]}", compact_every=3, **kw)


def exactly_equal(a, b) -> str | None:
    if a is None:
        return "missing"
    if (a.seq, a.snapshot_len, a.segment_token_ids) != (b.seq, b.snapshot_len, b.segment_token_ids):
        return f"bookkeeping differs: seq {a.seq} vs {b.seq}"
    if a.latents.shape != b.latents.shape or not torch.equal(a.latents, b.latents):
        return "latents differ"
    return None


async def states(s: Settings, ns: str, cids) -> dict:
    e = offline_engine()
    store = MemoryStore(s.redis_url, fingerprint=e.fingerprint, hidden_size=e.hidden_size, capacity=e.capacity,
                        dtype=e.state_dtype, namespace=ns)
    try:
        got = await store.load_many(list(cids))
    finally:
        await store.close()
    return {c: (v.state if getattr(v, "live", False) else None) for c, v in got.items()}


class Stop(Exception):
    pass



async def _acknowledge(bootstrap: str, group: str, topic: str, offset: int) -> None:
    """Commit `offset` of partition 0 for `group`, as the workers' consumer group would."""
    from aiokafka.structs import OffsetAndMetadata

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        c.assign([TopicPartition(topic, 0)])
        await c.commit({TopicPartition(topic, 0): OffsetAndMetadata(offset, "")})
    finally:
        await c.stop()

def test_rebuild_is_bit_for_bit_an_offline_replay_and_resumes_after_an_interruption(
        kafka_bootstrap: str, redis_url: str, topic_factory) -> None:
    topic = topic_factory(3)
    traffic = generate_traffic(6, (4, 9), seed=3, prefix="rb")
    produce(kafka_bootstrap, topic, traffic.records())
    s = settings_for(kafka_bootstrap, redis_url, topic)
    ns = f"rb{uuid.uuid4().hex[:8]}"
    engine = offline_engine()
    lines: list[str] = []

    def interrupt(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            raise Stop  # "killed" after a few batches: what is committed stays, the rest is redone

    async def go() -> None:
        first = Rebuild(s, engine, into=ns, through="end", batch_records=5, progress=interrupt, progress_every_s=0)
        with pytest.raises(Stop):
            await first.run()
        await first.close()
        # interrupted: the namespace says "building", so no worker serves from it meanwhile
        r0 = redis.Redis.from_url(redis_url)
        try:
            assert r0.hget(f"{ns}:epoch", "status") == b"building"
        finally:
            r0.close()
        second = Rebuild(s, engine, into=ns, through="end", batch_records=7, progress=lines.append, progress_every_s=0)
        try:
            rep = await second.run()
        finally:
            await second.close()
        assert rep.complete and rep.resumed_from, rep
        assert rep.records < len(traffic), "the second run read everything again instead of resuming"
        assert any("ETA" in ln for ln in lines), lines

    asyncio.run(go())
    want = compute_expected(traffic.turn_inputs()).states
    got = asyncio.run(states(s, ns, want))
    bad = {c: d for c in want if (d := exactly_equal(got[c], want[c]))}
    assert not bad, bad
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.hget(f"{ns}:epoch", "status") == b"ready"
        assert not list(r.scan_iter(f"{ns}:*:outbox")), "a rebuild writes memories only, never events"
    finally:
        r.close()


def _turn(cid: str, seq: int, text: str, tenant: str | None = None, stamp: int = 0) -> tuple[bytes, bytes]:
    return encode(TurnEvent(conversation_id=cid, seq=seq, tenant=tenant,
                            messages=[{"role": "user", "content": text}],
                            timestamp=BASE_TIME + timedelta(seconds=stamp)))


def test_scopes_and_the_live_rules(kafka_bootstrap: str, redis_url: str, topic_factory) -> None:
    """One tenant, one conversation; a delete ends a memory; a duplicate is dropped and a
    corrected resend is a conflict (counted, not applied): the rebuilt memory is what the
    live pipeline computed."""
    topic = topic_factory(1)
    recs = [_turn("a", 0, "alpha zero", "t1"), _turn("a", 1, "alpha one", "t1"), _turn("b", 0, "beta zero", "t1"),
            _turn("a", 0, "alpha zero", "t2"), _turn("b", 1, "beta one", "t1"), _turn("a", 1, "alpha EDITED", "t1"),
            _turn("b", 1, "beta one", "t1"),
            encode(ConversationDelete(conversation_id="b", tenant="t1", timestamp=BASE_TIME)),
            _turn("a", 2, "alpha two", "t1")]
    produce(kafka_bootstrap, topic, recs)
    s = settings_for(kafka_bootstrap, redis_url, topic)
    engine = offline_engine()
    from stream.identity import ConversationRef

    async def go(scope: Scope) -> tuple:
        ns = f"rs{uuid.uuid4().hex[:8]}"
        rb = Rebuild(s, engine, into=ns, scope=scope, through="end")
        try:
            rep = await rb.run()
            loaded = await rb.store.load_many([ConversationRef("t1", "a"), ConversationRef("t1", "b"),
                                               ConversationRef("t2", "a")])
        finally:
            await rb.close()
        return rep, {str(k): (v.seq if getattr(v, "live", False) else None) for k, v in loaded.items()}

    rep, seqs = asyncio.run(go(Scope()))
    assert seqs == {"t1/a": 2, "t1/b": None, "t2/a": 0}, seqs
    assert rep.dead_letters == {"conflicting_duplicate": 1} and rep.duplicates == 1 and rep.deleted == 1, rep
    rep, seqs = asyncio.run(go(Scope(tenant="t1")))
    assert seqs == {"t1/a": 2, "t1/b": None, "t2/a": None} and rep.scope == "tenant:t1", seqs
    rep, seqs = asyncio.run(go(Scope(tenant="t1", conversation="a")))
    assert seqs == {"t1/a": 2, "t1/b": None, "t2/a": None}, seqs
    assert rep.turns_applied == 3


def test_rebuild_stops_at_what_the_group_acknowledged_and_from_a_time(kafka_bootstrap: str, redis_url: str,
                                                                      topic_factory) -> None:
    topic = topic_factory(1)
    produced = produce(kafka_bootstrap, topic, [_turn("c", i, f"turn {i}") for i in range(6)])
    s = settings_for(kafka_bootstrap, redis_url, topic)

    async def go(**kw) -> tuple:
        ns = f"rc{uuid.uuid4().hex[:8]}"
        rb = Rebuild(s, offline_engine(), into=ns, **kw)
        try:
            rep = await rb.run()
            got = await rb.store.load("c")
        finally:
            await rb.close()
        return rep, got

    asyncio.run(_acknowledge(kafka_bootstrap, s.group_id, topic, produced[4].offset))  # turns 0..3 acknowledged
    rep, got = asyncio.run(go())
    assert got is not None and got.seq == 3 and rep.through == {"0": produced[3].offset}, rep
    # from a time: only what was published from then on (here: everything, published just now)
    rep, got = asyncio.run(go(through="end", from_time=datetime.now(UTC) + timedelta(hours=1)))
    assert got is None and rep.records == 0
    rep, got = asyncio.run(go(through="end", from_time=datetime.now(UTC) - timedelta(hours=1)))
    assert got is not None and got.seq == 5


def test_operator_commands(kafka_bootstrap: str, redis_url: str, topic_factory, monkeypatch,
                           capsys: pytest.CaptureFixture) -> None:
    """`evostream store status`, `store accept-loss` and `rebuild`, as an operator runs them."""
    from stream.cli import main

    topic = topic_factory(1)
    produced = produce(kafka_bootstrap, topic, [_turn("op", i, f"turn {i}") for i in range(3)])
    ns, into, group = f"op{uuid.uuid4().hex[:8]}", f"opr{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    for k, v in dict(EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap, EVOSTREAM_REDIS_URL=redis_url,
                     EVOSTREAM_TURNS_TOPIC=topic, EVOSTREAM_GROUP_ID=group, EVOSTREAM_REDIS_NAMESPACE=ns).items():
        monkeypatch.setenv(k, v)

    def cli(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main(list(args))
        return rc, capsys.readouterr().out

    rc, out = cli("store", "status")
    assert rc == 0 and json.loads(out)["verdict"] == "new", out

    # the group acknowledged; the store has no identity
    asyncio.run(_acknowledge(kafka_bootstrap, group, topic, produced[2].offset))
    rc, out = cli("store", "status")
    assert rc == 1 and json.loads(out)["verdict"] == "lost" and "emptied" in json.loads(out)["problem"], out
    assert cli("store", "accept-loss")[0] == 2  # not without --yes
    assert cli("store", "accept-loss", "--yes")[0] == 0
    rc, out = cli("store", "status")
    got = json.loads(out)
    assert rc == 0 and got["verdict"] == "ok" and got["identity"]["decision"] == "accept_loss", out

    rc, out = cli("rebuild", "--into", into)  # through what the group acknowledged: turns 0 and 1
    rep = json.loads(out)
    assert rc == 0 and rep["turns_applied"] == 2 and rep["complete"], out
    rc, out = cli("rebuild", "--into", into, "--through", "end")  # resumes: only the rest
    rep = json.loads(out)
    assert rc == 0 and rep["turns_applied"] == 1 and rep["resumed_from"] == {"0": produced[2].offset}, out
    assert cli("rebuild", "--into", "bad{ns}")[0] == 2
