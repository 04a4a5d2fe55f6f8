"""Per-key order survives emit retries (issue #7 item 6 / issue #12).

Before the fix, `KafkaEmitter.send_all` resent only the messages whose produce failed: with a
conversation's embedding failing and its `conversation_deleted` event taken by the broker, the
topic ended with the embedding AFTER the tombstone, and a downstream index applying events in
order resurrected the deleted conversation.

The real-broker test wraps the emitter's aiokafka producer so that ONE chosen message fails
once (the rest of the produce is real); the unit test covers the resend rule in isolation.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka.errors import KafkaTimeoutError

from stream.kafka.emitter import KafkaEmitter, OutMessage
from stream.backoff import Backoff
from tests.support.workers import read_topic_sync

FAST = Backoff(initial_s=0.01, max_s=0.05)


def _failed_future(exc: BaseException) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


class _FailOnce:
    """Wraps a producer's `send`: the first send of each value in `victims` fails (as a
    delivery that timed out); everything else goes to the real broker."""

    def __init__(self, producer, victims: set[bytes]):
        self._producer = producer
        self._send = producer.send
        self.victims = set(victims)
        self.failed: list[bytes] = []

    async def send(self, topic, value, key=None):
        if value in self.victims:
            self.victims.discard(value)
            self.failed.append(value)
            return _failed_future(KafkaTimeoutError("injected: delivery timed out"))
        return await self._send(topic, value, key=key)


def _last_positions(values: list[bytes]) -> dict[bytes, int]:
    return {v: i for i, v in enumerate(values)}


def test_partial_produce_failure_keeps_per_key_order_on_the_real_broker(kafka_bootstrap, topic_factory) -> None:
    topic = topic_factory(2)
    msgs = []
    for c in range(4):
        cid = f"c{c}".encode()
        msgs += [OutMessage(topic, cid, cid + b":emb0"), OutMessage(topic, cid, cid + b":emb1"),
                 OutMessage(topic, cid, cid + b":deleted")]
    victims = {b"c1:emb1", b"c2:emb0"}

    async def run() -> KafkaEmitter:
        em = KafkaEmitter(kafka_bootstrap, backoff=FAST, linger_ms=0)
        await em.start()
        wrapper = _FailOnce(em._producer, victims)
        em._producer.send = wrapper.send  # type: ignore[method-assign]
        try:
            await em.send_all(msgs)
        finally:
            await em.stop()
        assert sorted(wrapper.failed) == sorted(victims)
        return em

    em = asyncio.run(run())
    assert em.retries == 1
    by_key: dict[bytes, list[bytes]] = defaultdict(list)
    for rec in read_topic_sync(kafka_bootstrap, topic):
        by_key[rec.key].append(rec.value)
    for c in range(4):
        cid = f"c{c}".encode()
        got = by_key[cid]
        want = [cid + b":emb0", cid + b":emb1", cid + b":deleted"]
        assert set(got) == set(want), got
        last = _last_positions(got)
        assert last[want[0]] < last[want[1]] < last[want[2]], f"{cid!r}: last copies out of order: {got}"
        assert got[-1] == cid + b":deleted", f"{cid!r}: the tombstone is not last: {got}"


class _FakeProducer:
    """Our own logic in isolation: record what is sent; fail given (value, attempt) pairs."""

    def __init__(self, fail: set[tuple[bytes, int]]):
        self.fail = fail
        self.round = 0
        self.log: list[tuple[int, bytes]] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, topic, value, key=None):
        fut = asyncio.get_running_loop().create_future()
        if (value, self.round) in self.fail:
            fut.set_exception(KafkaTimeoutError("injected"))
        else:
            self.log.append((self.round, value))
            fut.set_result(None)
        return fut


def test_resend_rule_failed_message_and_later_same_key_only() -> None:
    t = "t"
    msgs = [OutMessage(t, b"a", b"a0"), OutMessage(t, b"b", b"b0"), OutMessage(t, b"a", b"a1"),
            OutMessage(t, b"a", b"a2"), OutMessage(t, b"b", b"b1"), OutMessage("dl", None, b"x0"),
            OutMessage("dl", None, b"x1")]

    async def run() -> _FakeProducer:
        em = KafkaEmitter("unused:1", backoff=FAST)
        fake = _FakeProducer({(b"a1", 0), (b"x0", 0), (b"a2", 1)})
        em._producer = fake  # type: ignore[assignment]
        orig_sleep = asyncio.sleep

        async def advance(delay: float) -> None:  # each retry round is one "attempt"
            fake.round += 1
            await orig_sleep(0)

        asyncio.sleep = advance  # type: ignore[assignment]
        try:
            await em.send_all(msgs)
        finally:
            asyncio.sleep = orig_sleep  # type: ignore[assignment]
        return fake

    fake = asyncio.run(run())
    rounds: dict[int, list[bytes]] = defaultdict(list)
    for r, v in fake.log:
        rounds[r].append(v)
    assert rounds[0] == [b"a0", b"b0", b"a2", b"b1", b"x1"]
    # a1 failed: a1 and the later a2 again (a0 was before it: not again); x0 alone (no key)
    # round 1: a2 fails again -> round 2: a2 alone (nothing of key a after it)
    assert rounds[1] == [b"a1", b"x0"]
    assert rounds[2] == [b"a2"]
    assert sorted(rounds) == [0, 1, 2]
