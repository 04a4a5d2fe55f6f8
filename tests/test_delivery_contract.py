"""The delivery contract, as proofs that fail when the contract is broken (issue #20):

1. *durable before acknowledged*: with `EVOSTREAM_REDIS_DURABILITY=aof` a batch's embeddings
   are not emitted, and its input offsets are not committed, until Redis confirmed that the
   checkpoint is fsynced (WAITAOF);
2. *offset after delivery*: input offsets are committed only after the embeddings were
   delivered to the broker;
3. a broker fault (the broker frozen mid-stream) loses nothing and duplicates nothing: every
   turn embedded exactly as the offline replay, every copy of an event byte-identical.

One real `evostream worker` subprocess serves the module, between two proxies the tests
control: tests/support/redis_proxy.py in front of a Redis of its own (AOF on), which can hold
the reply to WAITAOF, and tests/support/kafka_proxy.py in front of a tansu broker of its own,
which can swallow the worker's Produce requests. The session's broker and Redis are never
touched. Each test uses its own conversations and checks offsets relative to where it began.

Why a held reply and not a Redis crash: a SIGKILL of Redis cannot expose a missing fsync (the
page cache survives, tests/test_durability.py says why); a late durability confirmation
shows directly whether anything downstream waited for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devtools.localstack import RedisServer
from stream.kafka.topics import ensure_topics_sync
from tests.support.chaos import RedisProbe
from tests.support.kafka_proxy import KafkaProxy, ProxiedBroker, proxied_broker, wait
from tests.support.oracle import Outputs, compare, compute_expected, load_states, read_outputs
from tests.support.redis_proxy import RedisProxy
from tests.support.traffic import generate_traffic, produce, turn_record
from tests.support.workers import PipelineEnv, WorkerProc, read_topic_sync

HOLD_S = 3.0
"""How long a test keeps the worker waiting (held durability reply, swallowed produce) before
it looks: six offset-commit intervals (EVOSTREAM_COMMIT_INTERVAL_S=0.5 in tests) and several
producer retries. Not a speed bound: the proof is what did NOT happen in that window."""

FAST = {
    "EVOSTREAM_BROKER_PROBE_INTERVAL_S": "1",
    "EVOSTREAM_BROKER_PROBE_TIMEOUT_S": "2",
    "EVOSTREAM_BROKER_UNREACHABLE_AFTER_S": "3",
    "EVOSTREAM_BROKER_RETRY_BACKOFF_MAX_S": "2",
    "EVOSTREAM_REDIS_DURABILITY": "aof",
    "EVOSTREAM_REDIS_DURABILITY_TIMEOUT_MS": "60000",
}


@dataclass
class Stack:
    penv: PipelineEnv
    worker: WorkerProc
    broker: ProxiedBroker
    kafka: KafkaProxy
    redis: RedisProxy
    redis_direct: str  # the Redis behind the proxy, for the test's own reads

    def committed(self) -> int | None:
        return committed_offset(self.kafka.address, self.penv.group_id, self.penv.turns_topic)

    def outputs(self) -> Outputs:
        return read_outputs(self.kafka.address, self.penv.embeddings_topic, idle_ms=300)

    def seqs(self, cid: str) -> list[int]:
        """Seqs of `cid`'s embedding events, in topic order (one entry per copy)."""
        key = cid.encode()
        return [json.loads(m.value)["seq"] for m in read_topic_sync(self.kafka.address, self.penv.embeddings_topic,
                                                                    idle_ms=300) if m.key == key]


def committed_offset(bootstrap: str, group: str, topic: str, partition: int = 0) -> int | None:
    """The group's committed offset (OffsetFetch, without joining the group)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> int | None:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await c.start()
        try:
            return await c.committed(TopicPartition(topic, partition))
        finally:
            await c.stop()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run = tmp_path_factory.mktemp("contract")
    server = RedisServer(run / "redis", appendfsync="everysec", die_with_parent=True)
    server.start()
    rproxy = RedisProxy(server.port).start()
    try:
        with proxied_broker(run / "broker") as (broker, kproxy):
            names = {k: f"test.contract.{k}.{time.monotonic_ns()}" for k in ("turns", "emb", "dl")}
            ensure_topics_sync(kproxy.address, {names["turns"]: 1, names["emb"]: 1, names["dl"]: 1})
            penv = PipelineEnv(kafka_bootstrap=kproxy.address, redis_url=rproxy.url, turns_topic=names["turns"],
                               embeddings_topic=names["emb"], dead_letter_topic=names["dl"], partitions=1,
                               extra=dict(FAST))
            w = WorkerProc(penv, run, "contract").start()
            kproxy.watch(w.proc.pid)
            try:
                w.wait_ready(180)
                yield Stack(penv, w, broker, kproxy, rproxy, server.url)
            finally:
                w.kill()
    finally:
        rproxy.close()
        server.stop(grace=2.0)


def _warm(stack: Stack, cid: str) -> int:
    """One turn through, end to end; returns the committed offset afterwards (the partition
    is idle from then on)."""
    [p] = produce(stack.kafka.address, stack.penv.turns_topic, [turn_record(cid, 0, "warm up")])
    wait(lambda: stack.seqs(cid) == [0], timeout=120, what=f"{cid}: embedding of the warm-up turn")
    wait(lambda: stack.committed() == p.offset + 1, timeout=60, what=f"{cid}: warm-up offset committed")
    return p.offset + 1


# ----------------------------------------------------------------------------- 1. durability


def test_no_embedding_and_no_offset_commit_until_the_durability_wait_returns(stack: Stack) -> None:
    """The checkpoint's writes are in Redis, the WAITAOF confirming their fsync is held by the
    proxy: nothing reaches the embeddings topic and the input offset stays where it was. Once
    the reply is released, the embedding is delivered and the offset committed.

    Fails when the wait is dropped (`_durability_tail` returning []: no WAITAOF is ever sent
    and the embedding arrives at once) or moved after the emit or the acknowledgement."""
    held_durability_wait(stack, "dur", "WAITAOF")


def held_durability_wait(stack: Stack, cid: str, command: str) -> None:
    """Hold `command`'s reply while one turn of `cid` goes through; check what must not happen
    meanwhile, release, check that it then happens."""
    base = _warm(stack, f"{cid}-warm")
    probe = RedisProbe(stack.redis_direct, stack.penv.namespace)
    waits_before = stack.redis.commands[command]
    stack.redis.hold()
    try:
        [p] = produce(stack.kafka.address, stack.penv.turns_topic, [turn_record(cid, 0, "keep this safe")])

        def held_or_emitted() -> str | None:
            if stack.redis.holding_now:
                return "held"
            return "emitted" if stack.seqs(cid) else None

        first = wait(held_or_emitted, timeout=120, what="the worker's durability wait (or its output)")
        assert first == "held", (
            f"the embedding was delivered and no durability wait was pending "
            f"({command} sent: {stack.redis.commands[command] - waits_before})")
        # the commit itself landed: only the confirmation that it is durable is outstanding
        assert (probe.seqs([cid]) or {}).get(cid) == 0
        time.sleep(HOLD_S)
        assert stack.worker.alive(), stack.worker.tail(30)
        assert stack.redis.holding_now >= 1, "the held reply went through without release()"
        assert stack.seqs(cid) == [], "embedding emitted before Redis confirmed the checkpoint durable"
        assert stack.committed() == base, "input offset committed before the checkpoint was durable"
    finally:
        stack.redis.release()
        probe.close()
    wait(lambda: stack.seqs(cid) == [0], timeout=60, what="embedding delivered after the release")
    wait(lambda: stack.committed() == p.offset + 1, timeout=60, what="input offset committed after the release")


# ----------------------------------------------------------------------------- 2. offset after delivery


def test_input_is_acknowledged_only_after_its_output_is_delivered(stack: Stack) -> None:
    """The worker's Produce requests are swallowed (a broker that takes no writes): the turns
    are checkpointed in Redis (their events wait in the outbox), nothing reaches the embeddings
    topic and the input offset is NOT committed. When produce works again, the events are
    delivered in seq order and only then is the input acknowledged. The worker never exits.

    Fails when the input is acknowledged before the emit is delivered (e.g. a pipeline that
    sends without waiting for the broker's acknowledgement)."""
    base = _warm(stack, "out-warm")
    probe = RedisProbe(stack.redis_direct, stack.penv.namespace)
    pid = stack.worker.proc.pid
    dropped_before = stack.kafka.dropped_produce
    stack.kafka.partition(pid, "drop_produce")
    try:
        ps = produce(stack.kafka.address, stack.penv.turns_topic,
                     [turn_record("held", 0, "first"), turn_record("held", 1, "second")])
        wait(lambda: (probe.seqs(["held"]) or {}).get("held") == 1, timeout=120,
             what="turns checkpointed in Redis while produce fails")
        wait(lambda: stack.kafka.dropped_produce > dropped_before, timeout=60,
             what="a produce request of the worker swallowed")
        time.sleep(HOLD_S)
        assert stack.seqs("held") == []
        assert stack.committed() == base, "input acknowledged before its output was delivered"
        assert stack.worker.alive(), stack.worker.tail(30)
    finally:
        stack.kafka.heal(pid)
        probe.close()
    wait(lambda: set(stack.seqs("held")) == {0, 1}, timeout=120,
         what="both held embeddings delivered after produce works again")
    seqs = stack.seqs("held")
    last = {s: i for i, s in enumerate(seqs)}
    assert last[0] < last[1], f"last copies out of order: {seqs}"
    wait(lambda: stack.committed() == ps[-1].offset + 1, timeout=60, what="input acknowledged after delivery")
    assert stack.worker.alive()


# ----------------------------------------------------------------------------- 3. a broker fault


def test_broker_frozen_mid_stream_loses_and_duplicates_nothing(stack: Stack) -> None:
    """SIGSTOP the broker while turns are in flight, SIGCONT it after a few seconds (under the
    group session timeout: the member stays, its fetches, produces and commits time out and
    retry). Every turn is embedded exactly as the offline replay, every copy of an event is
    byte-identical, every checkpoint equals the replay, and the offsets reach the end."""
    traffic = generate_traffic(4, 5, seed=2020, prefix="bf")
    exp = compute_expected(traffic.turn_inputs())
    recs = traffic.records()
    half = len(recs) // 2
    produce(stack.kafka.address, stack.penv.turns_topic, recs[:half])
    stack.broker.pause()
    try:
        time.sleep(HOLD_S)
    finally:
        stack.broker.resume()
    ps = produce(stack.kafka.address, stack.penv.turns_topic, recs[half:])
    wait(lambda: traffic.keys() <= set(stack.outputs().embeddings), timeout=180,
         what="every turn's embedding after the broker came back")
    wait(lambda: stack.committed() == ps[-1].offset + 1, timeout=90, what="offsets committed to the end")
    outs = stack.outputs()
    rep = compare(outs, exp, states=load_states(stack.penv, exp.states), cids=traffic.conversation_ids)
    assert rep.states_checked == len(exp.states)
    assert not rep.problems(), rep.summary()
    assert rep.duplicates_byte_different == 0, rep.summary()


# ----------------------------------------------------------------------------- 4. replicas (Sentinel)


@pytest.fixture(scope="module")
def sentinel_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A primary with one replica and a Sentinel (tests/support/redis_servers.py), the worker
    finding its primary through the Sentinel with `EVOSTREAM_REDIS_DURABILITY=replicas`. The
    Sentinel monitors the primary AT THE PROXY's address, so the address it hands the worker is
    the proxy's: every command of the worker passes the proxy, which can hold the reply to WAIT."""
    from devtools.localstack import HOST, find_redis_server, free_ports
    from tests.support.redis_servers import RedisProc, SentinelProc

    run = tmp_path_factory.mktemp("contract-sentinel")
    binary = find_redis_server(run)
    mport, rport, sport = free_ports(3)
    primary = RedisProc(run / "primary", mport, name="primary", binary=binary, args=[])
    replica = RedisProc(run / "replica", rport, name="replica", binary=binary, args=["--replicaof", HOST, str(mport)])
    primary.start()
    replica.start()
    rproxy = RedisProxy(mport).start()
    service = "contract-primary"
    sentinel = SentinelProc(run / "sentinel", sport, binary=binary, master_port=rproxy.port, service=service)
    sentinel.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the replica linked and known to the Sentinel
            with replica.client() as r, sentinel.client() as c:
                if (r.info("replication").get("master_link_status") == "up"
                        and c.execute_command("SENTINEL REPLICAS", service)):
                    break
            assert time.monotonic() < deadline, "sentinel set not ready"
            time.sleep(0.2)
        with proxied_broker(run / "broker") as (broker, kproxy):
            names = {k: f"test.contract-sentinel.{k}.{time.monotonic_ns()}" for k in ("turns", "emb", "dl")}
            ensure_topics_sync(kproxy.address, {names["turns"]: 1, names["emb"]: 1, names["dl"]: 1})
            extra = {**FAST, "EVOSTREAM_REDIS_DURABILITY": "replicas", "EVOSTREAM_REDIS_DURABILITY_REPLICAS": "1"}
            penv = PipelineEnv(kafka_bootstrap=kproxy.address, redis_url=f"redis+sentinel://{sentinel.address}/{service}/0",
                               turns_topic=names["turns"], embeddings_topic=names["emb"],
                               dead_letter_topic=names["dl"], partitions=1, extra=extra)
            w = WorkerProc(penv, run, "contract-sentinel").start()
            kproxy.watch(w.proc.pid)
            try:
                w.wait_ready(180)
                yield Stack(penv, w, broker, kproxy, rproxy, f"redis://{HOST}:{mport}/0")
            finally:
                w.kill()
    finally:
        rproxy.close()
        for p in (sentinel, replica, primary):
            p.stop(grace=2.0)


def test_replicas_durability_through_sentinel_waits_for_the_replica(sentinel_stack: Stack) -> None:
    """`EVOSTREAM_REDIS_DURABILITY=replicas` behind Sentinel: while the WAIT that confirms a
    replica has the commit is held, nothing is emitted and no offset is committed; released,
    both happen."""
    held_durability_wait(sentinel_stack, "rep", "WAIT")
