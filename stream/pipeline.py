"""One micro-batch, top to bottom: decode -> order/dedupe -> model step -> checkpoint -> emit.

The order of the last three is what makes a crash harmless:

1. *step*: compute every due turn's embedding and memory latents (off the event loop);
2. *checkpoint*: one atomic compare-and-set per conversation writes the state deltas AND the
   encoded embedding events (the "outbox") to Redis. From here on, the turn is applied;
3. *emit*: produce the events and wait for the broker; then drop them from the outbox;
4. only then does the caller acknowledge the records (offsets commit later).

A worker killed anywhere replays its unacknowledged records. A replayed turn whose seq is not
newer than the checkpoint is never applied again; if its event is still in the outbox it is
re-emitted byte for byte, so every copy downstream is identical. A writer that lost its
partitions (a zombie) loses the compare-and-set and re-reads instead of overwriting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Awaitable, Callable, TypeVar

from schemas.events import (
    ConversationDelete,
    ConversationDeleted,
    DeadLetterReason,
    EmbeddingEvent,
    SourceRef,
    StageTimings,
    TurnEvent,
)
from schemas.vectors import encode_vector
from stream.checkpoints import CheckpointStore, CommitStatus, FingerprintMismatch, SourceOffset, TurnCommit
from stream.decode import Rejection, decode_inbound, make_dead_letter
from stream.emitter import OutMessage
from stream.faults import fault_point
from stream.metrics import Metrics
from stream.recovery import StoreUnavailable
from stream.settings import GapPolicy, Settings
from stream.state_cache import StateCache
from workers.engine import EvoEngine, TurnOutput
from workers.state import ConversationState

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class InboundRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass
class BatchReport:
    records: int = 0
    applied: int = 0
    duplicates: int = 0
    reemitted: int = 0
    gaps: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    deleted: int = 0
    conflicts: int = 0
    load_s: float = 0.0
    step_s: float = 0.0
    checkpoint_s: float = 0.0
    emit_s: float = 0.0


class Emitter:
    """What the pipeline needs from a producer (KafkaEmitter implements it)."""

    async def send_all(self, messages: list[OutMessage]) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass
class _Due:
    record: InboundRecord
    event: TurnEvent


class TurnPipeline:
    def __init__(self, engine: EvoEngine, store: CheckpointStore, emitter: Emitter, settings: Settings,
                 executor: Executor, metrics: Metrics | None = None, cache: StateCache | None = None):
        self.engine = engine
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.executor = executor
        self.metrics = metrics or Metrics()
        self.cache = cache if cache is not None else StateCache(settings.cache_max_bytes)
        self.paused = False
        self.last_offsets: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------------------------------
    async def process(self, records: list[InboundRecord]) -> BatchReport:
        """Handle one batch completely; returns only when its outputs are durable. Never raises
        for bad input; retries (pausing) while Redis or the broker are unavailable."""
        t0 = time.perf_counter()
        rep = BatchReport(records=len(records))
        self.metrics.records.inc(len(records))
        out: list[OutMessage] = []
        acks: dict[str, list[int]] = defaultdict(list)
        phase: list[_Due] = []
        pending_cids: set[str] = set()
        for rec in records:
            ev = decode_inbound(rec.key, rec.value, max_bytes=self.settings.max_record_bytes,
                                max_depth=self.settings.max_json_depth)
            if isinstance(ev, Rejection):
                out.append(self._dead_letter(rec, ev, rep))
            elif isinstance(ev, ConversationDelete):
                if ev.conversation_id in pending_cids:  # keep a delete ordered after its turns
                    await self._apply_turns(phase, out, acks, rep)
                    phase, pending_cids = [], set()
                out.append(await self._delete(ev, rep))
            else:
                phase.append(_Due(rec, ev))
                pending_cids.add(ev.conversation_id)
        if phase:
            await self._apply_turns(phase, out, acks, rep)

        if out:
            t = time.perf_counter()
            await self.emitter.send_all(out)
            rep.emit_s = time.perf_counter() - t
            self.metrics.emit_s.observe(rep.emit_s)
            fault_point("after_emit")  # test-only (stream/faults.py); no-op in production
        if acks:
            try:
                await self.store.ack_emitted(dict(acks))
            except StoreUnavailable as exc:  # harmless: the outbox entries expire with the state
                log.warning("could not clear outbox after emit (%s); duplicates possible on replay", exc)
            fault_point("after_ack")
        now_ms = time.time() * 1000
        for rec in records:
            self.last_offsets[(rec.topic, rec.partition)] = rec.offset
            if rec.timestamp_ms and rec.timestamp_ms > 0:
                self.metrics.turn_latency_s.observe(max(0.0, (now_ms - rec.timestamp_ms) / 1000))
        self.metrics.batch_s.observe(time.perf_counter() - t0)
        self.metrics.cache_bytes.set(self.cache.bytes)
        self.metrics.cache_entries.set(len(self.cache))
        return rep

    # ------------------------------------------------------------------------------------------
    async def _apply_turns(self, due: list[_Due], out: list[OutMessage], acks: dict[str, list[int]],
                           rep: BatchReport) -> None:
        """Apply a list of turn events (any conversations, in record order); retried for the
        conversations whose checkpoint another writer advanced meanwhile."""
        for attempt in range(5):
            conflicted = await self._apply_once(due, out, acks, rep)
            if not conflicted:
                return
            rep.conflicts += len(conflicted)
            self.metrics.conflicts.inc(len(conflicted))
            due = [d for d in due if d.event.conversation_id in conflicted]
            log.info("re-reading %d conversation(s) after checkpoint conflicts (attempt %d)", len(conflicted), attempt + 1)
        raise RuntimeError(f"checkpoint conflicts did not settle for {sorted({d.event.conversation_id for d in due})}")

    async def _apply_once(self, due: list[_Due], out: list[OutMessage], acks: dict[str, list[int]],
                          rep: BatchReport) -> set[str]:
        cids = list(dict.fromkeys(d.event.conversation_id for d in due))
        partitions = {d.event.conversation_id: d.record.partition for d in due}
        t = time.perf_counter()
        states, outboxes, foreign = await self._load_states(cids, partitions)
        rep.load_s += time.perf_counter() - t
        self.metrics.load_s.observe(time.perf_counter() - t)

        # --- what is due: order, duplicates, gaps, limits ---------------------------------
        last_seq = {cid: states[cid].seq for cid in states}
        start_seq = dict(last_seq)
        todo: list[_Due] = []
        for d in due:
            ev, cid = d.event, d.event.conversation_id
            if cid in foreign:
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR, reason=foreign[cid]), rep))
                continue
            if ev.seq <= last_seq[cid]:
                rep.duplicates += 1
                self.metrics.duplicates.inc()
                stored = outboxes.get(cid, {}).get(ev.seq)
                if stored is not None:
                    out.append(OutMessage(self.settings.embeddings_topic, cid.encode(), stored))
                    acks[cid].append(ev.seq)
                    rep.reemitted += 1
                    self.metrics.reemitted.inc()
                continue
            n_tok = self.engine.turn_tokens(ev.to_turn_input())
            if n_tok > self.settings.max_turn_tokens:
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.TURN_TOO_LONG,
                    reason=f"turn has {n_tok} tokens; the limit (max_turn_tokens) is {self.settings.max_turn_tokens}"), rep))
                continue
            if ev.seq > last_seq[cid] + 1:
                if self.settings.gap_policy is GapPolicy.DEAD_LETTER:
                    out.append(self._dead_letter(d.record, Rejection(
                        reason_code=DeadLetterReason.SEQ_GAP,
                        reason=f"seq {ev.seq} after {last_seq[cid]}: turns {last_seq[cid] + 1}..{ev.seq - 1} are missing"), rep))
                    continue
                rep.gaps += 1
                self.metrics.gaps.inc()
                log.warning("conversation %s: seq gap, applying %d after %d", cid, ev.seq, last_seq[cid])
            last_seq[cid] = ev.seq
            todo.append(d)
        if not todo:
            return set()

        # --- step --------------------------------------------------------------------------
        t = time.perf_counter()
        outputs = await self._step(states, todo, out, rep)
        rep.step_s += time.perf_counter() - t
        self.metrics.step_s.observe(time.perf_counter() - t)
        self.metrics.batch_size.observe(len(todo))
        if not outputs:
            return set()

        # --- checkpoint (state deltas + outbox, CAS on seq) -------------------------------
        by_cid: dict[str, list[tuple[_Due, TurnOutput, bytes]]] = defaultdict(list)
        step_ms = rep.step_s * 1000
        for d, o in outputs:
            by_cid[o.conversation_id].append((d, o, self._embedding_bytes(d, o, step_ms, rep.load_s * 1000)))
        commits = []
        for cid, items in by_cid.items():
            last_rec = items[-1][0].record
            commits.append(TurnCommit(
                conversation_id=cid, expected_seq=start_seq[cid], state=states[cid],
                deltas=[o.delta for _, o, _ in items], outbox={o.seq: b for _, o, b in items},
                source=SourceOffset(topic=last_rec.topic, partition=last_rec.partition, offset=last_rec.offset)))
        t = time.perf_counter()
        results = await self._with_store(lambda: self.store.commit(commits), "commit")
        rep.checkpoint_s += time.perf_counter() - t
        self.metrics.checkpoint_s.observe(time.perf_counter() - t)
        fault_point("after_checkpoint")  # test-only (stream/faults.py); no-op in production

        conflicted: set[str] = set()
        for res in results:
            cid = res.conversation_id
            if res.applied:
                for _, o, b in by_cid[cid]:
                    out.append(OutMessage(self.settings.embeddings_topic, cid.encode(), b))
                    acks[cid].append(o.seq)
                rep.applied += len(by_cid[cid])
                self.metrics.turns.inc(len(by_cid[cid]))
                self.cache.put(cid, states[cid], partitions[cid])
            elif res.status is CommitStatus.FINGERPRINT:
                self.cache.discard(cid)
                for d, _, _ in by_cid[cid]:
                    out.append(self._dead_letter(d.record, Rejection(
                        reason_code=DeadLetterReason.PROCESSING_ERROR,
                        reason="conversation checkpoint belongs to another model fingerprint"), rep))
            else:  # STALE: someone else advanced it; our in-memory state is void
                self.cache.discard(cid)
                conflicted.add(cid)
        return conflicted

    async def _step(self, states: dict[str, ConversationState], todo: list[_Due], out: list[OutMessage],
                    rep: BatchReport) -> list[tuple[_Due, TurnOutput]]:
        """Run the engine off the event loop. If the batch fails as a whole, isolate the turn
        that fails alone (dead-lettered as processing_error) instead of stalling the partition.
        States touched by a failed step are re-read from Redis, the source of truth, rather
        than copied before every step (that copy would cost megabytes per batch)."""
        turns = [d.event.to_turn_input() for d in todo]
        loop = asyncio.get_running_loop()
        try:
            outs = await loop.run_in_executor(self.executor, self.engine.step, states, turns)
            fault_point("in_step")  # test-only: states advanced in memory, nothing persisted
            return list(zip(todo, outs))
        except Exception:
            log.exception("model step failed for a batch of %d turns; retrying them one by one", len(todo))
        partitions = {d.event.conversation_id: d.record.partition for d in todo}
        await self._reload(states, partitions)
        result: list[tuple[_Due, TurnOutput]] = []
        broken: set[str] = set()
        for d, turn in zip(todo, turns):
            cid = turn.conversation_id
            if cid in broken:  # later turns of a conversation whose turn failed: memory would skip it
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR,
                    reason="an earlier turn of this conversation in the same batch failed in the model step"), rep))
                continue
            try:
                o = await loop.run_in_executor(self.executor, self.engine.step, {cid: states[cid]}, [turn])
                result.append((d, o[0]))
            except Exception as exc:  # noqa: BLE001 - reported with the record
                log.exception("model step failed for %s seq %d", cid, turn.seq)
                broken.add(cid)
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR, reason=f"model step failed: {type(exc).__name__}: {exc}"), rep))
                # its earlier turns of this batch still commit; drop what the failed step half-did
                done = [o for dd, o in result if o.conversation_id == cid]
                await self._reload(states, {cid: partitions[cid]})
                for o in done:
                    states[cid].apply(o.delta)
        return result

    async def _reload(self, states: dict[str, ConversationState], partitions: dict[str, int]) -> None:
        for cid in partitions:
            self.cache.discard(cid)
        fresh, _, _ = await self._load_states(list(partitions), partitions)
        states.update(fresh)

    # ------------------------------------------------------------------------------------------
    async def _load_states(self, cids: list[str], partitions: dict[str, int]
                           ) -> tuple[dict[str, ConversationState], dict[str, dict[int, bytes]], dict[str, str]]:
        states: dict[str, ConversationState] = {}
        missing = []
        for cid in cids:
            st = self.cache.get(cid)
            if st is None:
                missing.append(cid)
                self.metrics.cache_misses.inc()
            else:
                states[cid] = st
                self.metrics.cache_hits.inc()
        outboxes: dict[str, dict[int, bytes]] = {}
        foreign: dict[str, str] = {}
        if missing:
            try:
                loaded = await self._with_store(lambda: self.store.load_many(missing), "load")
            except FingerprintMismatch:
                loaded = {}
                for cid in missing:  # find which ones are foreign
                    try:
                        loaded[cid] = await self._with_store(lambda c=cid: self.store.load(c), "load")
                    except FingerprintMismatch as exc:
                        foreign[cid] = str(exc)
            for cid in missing:
                if cid in foreign:
                    continue
                ck = loaded.get(cid)
                if ck is None:
                    states[cid] = self.engine.new_state()
                else:
                    states[cid] = ck.state
                    outboxes[cid] = ck.outbox
                # a cached state has no pending outbox we do not already know about: events
                # are emitted in the batch that commits them
        return states, outboxes, foreign

    async def _with_store(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a store operation; while Redis is unavailable, pause (hold this batch) and retry."""
        while True:
            try:
                result = await op()
                if self.paused:
                    self.paused = False
                    self.metrics.paused.set(0)
                    log.info("checkpoint store back; resuming")
                return result
            except StoreUnavailable as exc:
                if not self.paused:
                    self.metrics.store_unavailable.inc()
                    log.warning("checkpoint store unavailable during %s (%s): pausing consumption", what, exc)
                self.paused = True
                self.metrics.paused.set(1)
                await self.store.wait_until_available()

    async def _delete(self, ev: ConversationDelete, rep: BatchReport) -> OutMessage:
        cid = ev.conversation_id
        cached = self.cache.get(cid)
        through: int | None = cached.seq if cached is not None else None
        if through is None:
            try:
                ck = await self._with_store(lambda: self.store.load(cid), "load")
                through = ck.seq if ck is not None else None
            except FingerprintMismatch:
                through = None
        await self._with_store(lambda: self.store.delete(cid), "delete")
        self.cache.discard(cid)
        rep.deleted += 1
        self.metrics.deletes.inc()
        tomb = ConversationDeleted(conversation_id=cid, deleted_through_seq=through if through is not None and through >= 0 else None,
                                   at=datetime.now(timezone.utc), tenant=ev.tenant)
        return OutMessage(self.settings.embeddings_topic, cid.encode(), tomb.model_dump_json().encode())

    def _dead_letter(self, rec: InboundRecord, rej: Rejection, rep: BatchReport) -> OutMessage:
        code = rej.reason_code.value
        rep.dead_letters[code] = rep.dead_letters.get(code, 0) + 1
        self.metrics.dead_letters.labels(reason=code).inc()
        log.warning("dead-letter %s/%d@%d: %s: %s", rec.topic, rec.partition, rec.offset, code, rej.reason[:200])
        dl = make_dead_letter(rej, rec.key, rec.value, rec.topic, rec.partition, rec.offset, rec.timestamp_ms,
                              self.settings.worker_id)
        return OutMessage(self.settings.dead_letter_topic, rec.key if rec.key else None, dl.model_dump_json().encode())

    def _embedding_bytes(self, d: _Due, o: TurnOutput, step_ms: float, load_ms: float) -> bytes:
        rec = d.record
        queue_ms = max(0.0, time.time() * 1000 - rec.timestamp_ms) if rec.timestamp_ms and rec.timestamp_ms > 0 else 0.0
        ev = EmbeddingEvent(
            conversation_id=o.conversation_id, seq=o.seq, vector=encode_vector(o.embedding),
            dim=int(o.embedding.shape[0]), model=self.engine.model_name[:256] or "evoembedding",
            checkpoint=self.engine.fingerprint, memory_len=o.memory_len, tenant=d.event.tenant,
            source=SourceRef(topic=rec.topic, partition=rec.partition, offset=rec.offset),
            timings=StageTimings(queue_ms=queue_ms, step_ms=step_ms, checkpoint_ms=load_ms),
            produced_at=datetime.now(timezone.utc),
        )
        return ev.model_dump_json().encode()
