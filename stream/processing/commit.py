"""One batch's commit: the order of the writes that makes a crash anywhere harmless.

A batch gathers, while it is processed, everything it will write: per conversation the state
after its turns (a `TurnCommit`: deltas, outbox events, the (gen, seq) it started from), the
output records (embeddings, dead letters, tombstones) and the input records whose offsets it
will acknowledge. `BatchCommit` then writes them in this order, and only in this order:

1. *checkpoint*: one atomic compare-and-set per conversation writes the state deltas AND the
   encoded embedding events (the "outbox") to Redis, followed by the durability wait
   (`EVOSTREAM_REDIS_DURABILITY`). From here on, the turns are applied;
2. *emit*: produce every output record and wait until the broker has them all;
3. *clear the outbox*: drop the delivered events from Redis;
4. *acknowledge*: only now are the input records acknowledged (their offsets commit later).

The store's watermarks ("every record through offset o of partition p is reflected here",
stream/state/epoch.py) ride in the checkpoint's round trip, or are written on their own
before the acknowledgement when the batch's last store write was not a checkpoint (a delete)
or it had none; a store found lost at that point holds the acknowledgement (issue #17).

A worker killed anywhere replays its unacknowledged records. A replayed turn whose seq is not
newer than the stored one is never applied again; if its event is still in the outbox it is
re-emitted byte for byte, so every copy downstream is identical. A writer that lost its
partitions (a zombie) loses the compare-and-set and re-reads instead of overwriting; a delete
is a tombstone that refuses every commit computed before it.

The named points between the steps (`STAGES`) can be observed: tracing, or the test harness's
fault injection (devtools/faults.py), which registers an observer; production registers none.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from stream.identity import ConversationRef
from stream.kafka.emitter import OutMessage
from stream.processing.outage import PauseOnOutage
from stream.processing.records import BatchReport, InboundRecord
from stream.state.availability import StoreUnavailable
from stream.state.records import CommitResult, TurnCommit

log = logging.getLogger(__name__)

STAGES = ("in_step", "after_checkpoint", "after_emit", "after_ack")
"""in_step: the model step ran (states advanced in memory), nothing written;
after_checkpoint: Redis has the new states and the outbox, nothing emitted;
after_emit: the broker has the outputs, the outbox still holds them;
after_ack: outbox cleared, the input offsets not yet acknowledged."""

StageObserver = Callable[[str], None]
_observers: list[StageObserver] = []


def observe_stages(fn: StageObserver) -> None:
    """Call `fn(stage)` at every stage of every batch of this process (see STAGES)."""
    _observers.append(fn)


def reached(stage: str) -> None:
    for fn in _observers:
        fn(stage)


class Emitter:
    """What a batch needs from a producer (stream.kafka.emitter.KafkaEmitter implements it)."""

    async def send_all(self, messages: list[OutMessage]) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


class BatchCommit:
    def __init__(self, records: list[InboundRecord], store: Any, emitter: Emitter, guard: PauseOnOutage,
                 embeddings_topic: str, metrics: Any, rep: BatchReport) -> None:
        self.records = records
        self.store = store
        self.emitter = emitter
        self.guard = guard
        self.embeddings_topic = embeddings_topic
        self.metrics = metrics
        self.rep = rep
        self.outputs: list[OutMessage] = []  # in the order they will be produced
        self.in_outbox: dict[ConversationRef, list[int]] = defaultdict(list)  # to clear once delivered
        self.through: dict[tuple[str, int], int] = {}  # last offset per (topic, partition) of the batch
        for r in records:
            key = (r.topic, r.partition)
            if r.offset > self.through.get(key, -1):
                self.through[key] = r.offset
        self.sealed = False  # the watermarks went out with the batch's last store write

    # --- gathering ---------------------------------------------------------------------------
    def send(self, message: OutMessage) -> None:
        """An output with no state behind it (a dead letter, a tombstone)."""
        self.outputs.append(message)

    def resend(self, ref: ConversationRef, seq: int, event: bytes) -> None:
        """An event committed earlier and still in the outbox (a replayed turn): the same bytes."""
        self.outputs.append(OutMessage(self.embeddings_topic, ref.conversation_id.encode(), event))
        self.in_outbox[ref].append(seq)

    # --- 1. checkpoint -----------------------------------------------------------------------
    async def checkpoint(self, commits: list[TurnCommit]) -> list[CommitResult]:
        """Compare-and-set every conversation's state and outbox (one round trip, then the
        durability wait). The events of the commits that applied are queued for the emit."""
        t = time.perf_counter()
        results = await self.guard(lambda: self.store.commit(commits, through=self.through), "commit")
        self.sealed = True
        self.rep.checkpoint_s += time.perf_counter() - t
        self.metrics.checkpoint_s.observe(time.perf_counter() - t)
        reached("after_checkpoint")
        for c, res in zip(commits, results):
            if res.applied:
                for seq, event in sorted(c.outbox.items()):
                    self.resend(c.ref, seq, event)
        return results

    # --- 2-4. emit, clear the outbox, acknowledge --------------------------------------------
    async def finish(self, acknowledge: Callable[[list[InboundRecord]], Awaitable[None]] | None = None) -> None:
        if self.outputs:
            t = time.perf_counter()
            await self.emitter.send_all(self.outputs)
            self.rep.emit_s = time.perf_counter() - t
            self.metrics.emit_s.observe(self.rep.emit_s)
            reached("after_emit")
        if self.in_outbox:
            try:
                await self.store.ack_emitted(dict(self.in_outbox))
            except StoreUnavailable as exc:  # harmless: the outbox entries expire with the state
                log.warning("could not clear outbox after emit (%s); duplicates possible on replay", exc)
            reached("after_ack")
        watch = getattr(self.store, "epoch", None)
        if watch is not None and watch.active:
            if not self.sealed:
                await self.guard(lambda: self.store.advance(self.through), "watermark")
            # a store found lost meanwhile (the periodic check) is not acknowledged into
            await self.guard(self._trusted, "acknowledge")
        if acknowledge is not None:
            await acknowledge(self.records)
        if watch is not None and watch.active:
            watch.note_acked(self.through)

    async def _trusted(self) -> None:
        self.store.epoch.raise_if_lost()
