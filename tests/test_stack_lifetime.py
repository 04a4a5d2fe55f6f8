"""Local stack lifetimes are consistent (issue #11): the broker keeps nothing across a stack
stop (memory storage), so a stack start clears Redis too; before, checkpoints outlived their
topics and re-produced turns were all skipped as duplicates. Restarting the Redis service
alone (what the chaos tests do) still keeps its data."""

from __future__ import annotations

from pathlib import Path

import redis

from devtools.localstack import LocalStack
from stream.kafka.topics import ensure_topics_sync


def _topics(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    from stream.kafka.topics import run_sync

    async def names() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return run_sync(names)


def test_stack_restart_is_a_clean_slate_for_broker_and_redis(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "stack")
    stack.start()
    try:
        ensure_topics_sync(stack.kafka_bootstrap, {"lifetime.turns": 2})
        r = redis.Redis.from_url(stack.redis_url)
        r.set("evostream:checkpoint", b"state")
        r.close()
        # the Redis service alone restarts with its data
        stack.redis.restart()
        r = redis.Redis.from_url(stack.redis_url)
        assert r.get("evostream:checkpoint") == b"state"
        r.close()
    finally:
        stack.stop(grace=3.0)
    stack = LocalStack(tmp_path / "stack")
    stack.start()
    try:
        assert "lifetime.turns" not in _topics(stack.kafka_bootstrap)  # the broker forgot ...
        r = redis.Redis.from_url(stack.redis_url)
        assert r.get("evostream:checkpoint") is None                   # ... and so did Redis
        assert r.dbsize() == 0
        r.close()
    finally:
        stack.stop(grace=3.0)
