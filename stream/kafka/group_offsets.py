"""What a consumer group has acknowledged, read without joining the group.

Why: the memory-state store must reflect at least every record the group acknowledged
(stream/state/epoch.py). A worker compares the two when it starts, and `evostream rebuild`
rebuilds through the group's offsets, so that the turns after them are processed (and their
embeddings emitted) by the workers, as usual.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


async def committed_offsets(bootstrap: str, group: str, topic: str, *,
                            client_kwargs: dict[str, Any] | None = None) -> dict[tuple[str, int], int]:
    """{(topic, partition): next offset the group reads} for the partitions it committed
    (OffsetFetch, without joining the group); {} for a group that never committed."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                         **(client_kwargs or {}))
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        if parts is None:
            await c.topics()
            parts = c.partitions_for_topic(topic) or set()
        out: dict[tuple[str, int], int] = {}
        for p in sorted(parts):
            off = await c.committed(TopicPartition(topic, p))
            if off is not None and off >= 0:
                out[(topic, p)] = int(off)
        return out
    finally:
        await c.stop()
