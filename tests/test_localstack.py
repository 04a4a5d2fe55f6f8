"""The local stack itself: real tansu broker + real Valkey/Redis behave as evostream needs.

These tests pin down the broker/Redis properties the rest of the system relies on
(keyed partitioning, consumer-group resume, Redis persistence across restarts), so a
change of broker or Redis build that breaks them fails here, not deep in a chaos test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from devtools.localstack import (
    ENV_KAFKA,
    ENV_REDIS,
    LocalStack,
    LocalStackError,
    RedisServer,
    StackAlreadyRunning,
)
from stream.kafka.topics import (
    DEAD_LETTER_TOPIC,
    DEFAULT_TOPICS,
    EMBEDDINGS_TOPIC,
    TURNS_TOPIC,
    delete_topics,
    ensure_topics,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
# Short group timeouts: tansu holds JoinGroup for about half the session timeout.
GROUP_OPTS = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000, rebalance_timeout_ms=6000)


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (orphans may wait for a lazy init to reap)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _pids(run_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(run_dir.glob("*.pid"))]


async def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> list[int]:
    """Send (key, value) pairs in order; return each record's partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=16384)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in items]
        return [(await f).partition for f in futures]
    finally:
        await producer.stop()


async def _consume_assigned(bootstrap: str, topic: str, count: int, timeout: float = 10.0) -> list:
    """Read ``count`` records from every partition of ``topic`` without a group (no join wait)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - first metadata fetch
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


def test_default_topic_names() -> None:
    assert DEFAULT_TOPICS == {TURNS_TOPIC: 8, EMBEDDINGS_TOPIC: 8, DEAD_LETTER_TOPIC: 1}
    assert (TURNS_TOPIC, EMBEDDINGS_TOPIC, DEAD_LETTER_TOPIC) == (
        "evostream.turns",
        "evostream.embeddings",
        "evostream.dead-letter",
    )


def test_keyed_round_trip_same_key_same_partition(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(4)
    keys = [f"conv-{i}".encode() for i in range(12)]
    items = [(k, f"{k.decode()}|{n}".encode()) for n in range(3) for k in keys]

    async def go() -> tuple[list[int], list]:
        parts = await _produce(kafka_bootstrap, topic, items)
        return parts, await _consume_assigned(kafka_bootstrap, topic, len(items))

    sent_partitions, records = asyncio.run(go())
    assert len(records) == len(items)
    by_key: dict[bytes, list] = defaultdict(list)
    for r in records:
        by_key[r.key].append(r)
    for key in keys:
        recs = by_key[key]
        # Same key -> one partition, Java-compatible murmur2 mapping, order preserved.
        assert {r.partition for r in recs} == {(murmur2(key) & 0x7FFFFFFF) % 4}
        assert [int(r.value.split(b"|")[1]) for r in sorted(recs, key=lambda r: r.offset)] == [0, 1, 2]
    assert sent_partitions == [(murmur2(k) & 0x7FFFFFFF) % 4 for k, _ in items]
    assert len({r.partition for r in records}) > 1, "keys should spread over partitions"


def test_consumer_group_commit_and_resume(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(topic, 0)

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **GROUP_OPTS,
        )

    async def go() -> tuple[list[int], int | None, list[int], int | None]:
        await _produce(kafka_bootstrap, topic, [(b"k", str(i).encode()) for i in range(10)])
        first = consumer()
        await first.start()
        try:
            got = [int((await first.getone()).value) for _ in range(4)]
            await first.commit({tp: 4})  # next offset to read, Kafka convention
            committed = await first.committed(tp)
        finally:
            await first.stop()
        second = consumer()
        await second.start()
        try:
            rest: list[int] = []
            while len(rest) < 6:
                batch = await second.getmany(tp, timeout_ms=5000)
                assert batch, "second member got nothing"
                rest.extend(int(r.value) for r in batch[tp])
            committed_before = await second.committed(tp)
        finally:
            await second.stop()
        return got, committed, rest, committed_before

    got, committed, rest, committed_second = asyncio.run(go())
    assert got == [0, 1, 2, 3]
    assert committed == 4
    assert rest == [4, 5, 6, 7, 8, 9]
    assert committed_second == 4  # reading does not commit with auto-commit off


def test_redis_set_get(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0  # the fixture flushed
    redis_client.set("k", b"\x00\xffbinary")
    assert redis_client.get("k") == b"\x00\xffbinary"
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset("h", mapping={"seq": 3, "state": b"blob"}).incr("n").execute()
    assert redis_client.hgetall("h") == {b"seq": b"3", b"state": b"blob"}
    assert redis_client.get("n") == b"1"


def test_redis_stop_start_and_kill_keep_data(local_stack: LocalStack, redis_client: redis.Redis) -> None:
    server = local_stack.redis
    assert server is not None
    url, old_pid = local_stack.redis_url, server.pid
    redis_client.set("before-stop", "1")
    redis_client.hset("conv:a", mapping={"seq": 7})

    server.stop()
    assert not server.is_running() and not _alive(old_pid)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, retry=None, socket_connect_timeout=0.5).ping()
    server.start()
    assert local_stack.redis_url == url and server.pid != old_pid
    fresh = redis.Redis.from_url(url)
    assert fresh.get("before-stop") == b"1"
    assert fresh.hgetall("conv:a") == {b"seq": b"7"}

    # A crash right after an acknowledged write: appendfsync always keeps it.
    fresh.set("before-kill", "2")
    server.kill()
    server.start()
    fresh = redis.Redis.from_url(url)
    assert fresh.get("before-kill") == b"2" and fresh.get("before-stop") == b"1"
    fresh.close()


def test_redis_pause_resume(local_stack: LocalStack) -> None:
    server = local_stack.redis
    assert server is not None
    client = redis.Redis.from_url(local_stack.redis_url, socket_timeout=0.3, retry=None)
    server.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            client.ping()
    finally:
        server.resume()
    client = redis.Redis.from_url(local_stack.redis_url, socket_timeout=2)
    assert client.ping()
    client.close()


def test_ensure_topics_idempotent(kafka_bootstrap: str) -> None:
    name = f"test.ensure.{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        assert await ensure_topics(kafka_bootstrap, {name: 3}) == {name: 3}
        assert await ensure_topics(kafka_bootstrap, {name: 3}) == {name: 3}
        # Concurrent callers (several workers starting at once) all succeed.
        results = await asyncio.gather(*(ensure_topics(kafka_bootstrap, {name: 3}) for _ in range(3)))
        assert results == [{name: 3}] * 3
        # A mismatched count is reported, never "fixed".
        assert await ensure_topics(kafka_bootstrap, {name: 5}) == {name: 3}
        with pytest.raises(ValueError, match="invalid topic spec 'bad': 0 partitions"):
            await ensure_topics(kafka_bootstrap, {"bad": 0})
        await delete_topics(kafka_bootstrap, [name])
        await delete_topics(kafka_bootstrap, [name])  # already gone: fine

    asyncio.run(go())


def test_double_start_refused(local_stack: LocalStack) -> None:
    with pytest.raises(StackAlreadyRunning, match="devtools.localstack stop"):
        LocalStack(local_stack.run_dir).start()
    assert local_stack.status().running


def test_api_context_manager_stop_leaves_no_pids(tmp_path: Path) -> None:
    with LocalStack(tmp_path / "stack") as stack:
        pids = _pids(stack.run_dir)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        env = dict(line.split("=", 1) for line in (stack.run_dir / "env").read_text().split())
        assert env == {ENV_KAFKA: stack.kafka_bootstrap, ENV_REDIS: stack.redis_url}
    assert not any(_alive(p) for p in pids)
    assert not list(stack.run_dir.glob("*.pid"))
    assert not stack.status().any_running


def test_cli_start_status_env_stop(tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devtools.localstack", *args, "--run-dir", str(run_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )

    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        pids = _pids(run_dir)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        assert cli("status").returncode == 0
        again = cli("start")
        assert again.returncode == 1 and "already running" in again.stderr and "stop" in again.stderr
        env = cli("env")
        assert env.returncode == 0 and env.stdout == (run_dir / "env").read_text()
        assert env.stdout.startswith(f"{ENV_KAFKA}=127.0.0.1:")
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(p) for p in pids)
    assert cli("status").returncode == 3


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path, taken.getsockname()[1])
        with pytest.raises(LocalStackError, match="(?s)exited.*Address already in use"):
            server.start(timeout=5)
    assert not server.is_running()
    assert not os.path.exists(server.pid_file)
