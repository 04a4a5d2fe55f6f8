"""The consumer-lag gauge, per partition the worker OWNS, correct across rebalances.

What went wrong before: lag was computed for every partition the pipeline had ever processed,
and the broker's highwater was asked for each; a partition lost in a rebalance made that call
fail on aiokafka's "Partition is not assigned" assertion, the exception was swallowed and the
rest of the loop skipped: lost partitions kept being exported, gained ones never appeared.

Now: the set of exported partitions is exactly the current assignment (labels of revoked
partitions are removed, so a dashboard summing the gauge over workers counts each partition
once); each partition is looked up on its own (one failure skips one partition); offsets
processed under a previous ownership are forgotten on revoke. Lag = highwater (the offset the
next produced record will get) minus the next offset to process: the last processed offset
+ 1, or, before this worker has processed anything of a newly assigned partition, the
consumer's position (where it resumes).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

OffsetFn = Callable[[int], "int | None | Awaitable[int | None]"]


class LagGauge:
    def __init__(self, gauge: Any, topic: str):
        self.gauge = gauge
        self.topic = topic
        self.assigned: set[int] = set()
        self._processed: dict[int, int] = {}

    def assign(self, partitions: Iterable[int]) -> None:
        """The new assignment (replaces the old one: faust reports the full set)."""
        new = set(partitions)
        for p in self.assigned - new:
            self._forget(p)
        self.assigned = new

    def revoke(self, partitions: Iterable[int]) -> None:
        for p in set(partitions):
            self._forget(p)
            self.assigned.discard(p)

    def _forget(self, p: int) -> None:
        self._processed.pop(p, None)
        try:
            self.gauge.remove(str(p))
        except KeyError:  # never exported
            pass

    def processed(self, partition: int, offset: int) -> None:
        if partition in self.assigned and offset >= self._processed.get(partition, -1):
            self._processed[partition] = offset

    async def refresh(self, highwater: OffsetFn, position: OffsetFn) -> dict[int, int]:
        """Set the gauge for every assigned partition whose highwater is known; returns it."""
        out: dict[int, int] = {}
        for p in sorted(self.assigned):
            try:
                hw = await _value(highwater(p))
                if hw is None:
                    continue
                done = self._processed.get(p)
                nxt = done + 1 if done is not None else await _value(position(p))
                if nxt is None:
                    continue
            except Exception as exc:  # noqa: BLE001 - one partition's failure never stops the others
                log.debug("lag of %s/%d not available: %s: %s", self.topic, p, type(exc).__name__, exc)
                continue
            if p not in self.assigned:  # revoked while we awaited
                continue
            out[p] = max(0, int(hw) - int(nxt))
            self.gauge.labels(partition=str(p)).set(out[p])
        return out


async def _value(v: Any) -> Any:
    return await v if inspect.isawaitable(v) else v


__all__ = ["LagGauge"]
