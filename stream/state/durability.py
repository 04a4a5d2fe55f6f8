"""Durable before acknowledged: the wait appended to every write pipeline.

`EVOSTREAM_REDIS_DURABILITY` says what must hold before a commit counts (and so before the
batch's input offsets are acknowledged): `reply` (in Redis' memory), `aof` (WAITAOF: fsynced
to the local append-only file), `replicas` (WAIT: received by N replicas) or both. The wait is
appended to the commit's own pipeline, on the same connection after the writes, so it covers
exactly those writes and costs no extra round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream.settings import Durability
from stream.state.availability import StoreUnavailable, is_unavailable
from stream.state.errors import MemoryStateError


@dataclass(frozen=True)
class DurabilityPolicy:
    level: Durability = Durability.REPLY
    replicas: int = 1
    timeout_ms: int = 2000
    where: str = "redis"  # for messages (no credentials)

    def tail(self) -> list[tuple[str, ...]]:
        """Commands to append to a write pipeline; they reply once the writes are as durable
        as configured."""
        t = str(self.timeout_ms)
        d = self.level
        if d is Durability.AOF:
            return [("WAITAOF", "1", "0", t)]
        if d is Durability.REPLICAS:
            return [("WAIT", str(self.replicas), t)]
        if d is Durability.AOF_AND_REPLICAS:
            return [("WAITAOF", "1", str(self.replicas), t)]
        return []

    @property
    def needs_aof(self) -> bool:
        return self.level in (Durability.AOF, Durability.AOF_AND_REPLICAS)

    def check(self, replies: list[Any]) -> None:
        """Raise unless the tail's replies say the writes are durable. Written but not yet
        durable is StoreUnavailable: nothing is acknowledged, and the retry finds the commit
        applied (ALREADY_APPLIED) and waits again."""
        d = self.level
        for reply in replies:
            if isinstance(reply, Exception):
                if is_unavailable(reply):  # e.g. the primary was just demoted (Sentinel failover, issue #8)
                    raise StoreUnavailable(f"durability wait ({d.value}) on {self.where}: {reply}") from reply
                raise MemoryStateError(f"durability wait ({d.value}) failed on {self.where}: {reply}") from reply
            local, replicas = (int(reply[0]), int(reply[1])) if isinstance(reply, list) else (1, int(reply))
            need_replicas = self.replicas if d in (Durability.REPLICAS, Durability.AOF_AND_REPLICAS) else 0
            if (self.needs_aof and local < 1) or replicas < need_replicas:
                raise StoreUnavailable(
                    f"{self.where}: writes not durable within {self.timeout_ms} ms "
                    f"(fsynced locally: {local}, replicas: {replicas}, durability={d.value})")
