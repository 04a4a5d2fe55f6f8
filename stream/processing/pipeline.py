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
partitions (a zombie) loses the compare-and-set and re-reads instead of overwriting; a delete
is a tombstone that refuses every commit computed before it.

A conversation is (tenant, conversation id) everywhere (`stream.identity`). One whose
checkpoint is corrupt, foreign or another identity's is quarantined: its turns are
dead-lettered with the reason and every other conversation in the batch flows on.
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
    MemoryOrigin,
    SourceRef,
    StageTimings,
    TurnEvent,
)
from schemas.turns import TurnInput
from schemas.vectors import encode_vector
from stream.runtime.logs import fields as log_fields
from stream.state.errors import StaleDelete
from stream.state.records import CommitStatus, MemoryProblem, SourceOffset, TurnCommit
from stream.state.store import MemoryStore
from stream.processing.decode import Rejection, decode_inbound, make_dead_letter
from stream.processing.input_shapes import InputShapes
from stream.kafka.emitter import OutMessage
from devtools.faults import fault_point
from stream.identity import ConversationRef
from stream.runtime.metrics import Metrics
from stream.state.availability import StoreUnavailable
from stream.settings import GapPolicy, Settings
from stream.state.cache import StateCache
from workers.engine import EvoEngine, TurnOutput
from workers.state import NO_SEQ, ConversationState

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
    ref: ConversationRef


@dataclass
class _View:
    """Where a conversation stands for this batch (from the cache or Redis)."""

    state: ConversationState
    gen: int
    seq: int  # the (gen, seq) a commit must name (compare-and-set)
    origin: MemoryOrigin
    fresh: bool  # no live state: the first commit starts generation `gen`
    outbox: dict[int, bytes] = field(default_factory=dict)
    gap_rejects: int = 0
    gen_start: tuple[int, int] | None = None  # (partition, offset) where the live generation began
    deleted_at: tuple[int, int] | None = None  # (partition, offset) of the delete that ended it
    restarted: bool = False  # a turn published after the delete restarted the seqs


def conversation_ref(ev: TurnEvent | ConversationDelete) -> ConversationRef:
    return ConversationRef(ev.tenant, ev.conversation_id)


class TurnPipeline:
    def __init__(self, engine: EvoEngine, store: MemoryStore, emitter: Emitter, settings: Settings,
                 executor: Executor, metrics: Metrics | None = None, cache: StateCache | None = None):
        self.engine = engine
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.executor = executor
        self.metrics = metrics or Metrics()
        self.cache = cache if cache is not None else StateCache(settings.cache_max_bytes)
        self.input_shapes = InputShapes(self.metrics.registry)  # tolerant reader counters (issue #13)
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
        acks: dict[ConversationRef, list[int]] = defaultdict(list)
        phase: list[_Due] = []
        pending: set[ConversationRef] = set()
        for rec in records:
            ev = decode_inbound(rec.key, rec.value, max_bytes=self.settings.max_record_bytes,
                                max_depth=self.settings.max_json_depth, strict=self.settings.input_strict)
            if isinstance(ev, Rejection):
                out.append(self._dead_letter(rec, ev, rep))
                continue
            self.input_shapes.observe(ev)
            ref = conversation_ref(ev)
            if isinstance(ev, ConversationDelete):
                if ref in pending:  # keep a delete ordered after its turns
                    await self._apply_turns(phase, out, acks, rep)
                    phase, pending = [], set()
                tomb = await self._delete(ev, ref, rec, rep)
                if tomb is not None:
                    out.append(tomb)
            elif not ev.has_text:  # only messages the model does not read (issue #13)
                self.input_shapes.turn_without_text(ev)
            else:
                phase.append(_Due(rec, ev, ref))
                pending.add(ref)
        if phase:
            await self._apply_turns(phase, out, acks, rep)

        if out:
            t = time.perf_counter()
            await self.emitter.send_all(out)
            rep.emit_s = time.perf_counter() - t
            self.metrics.emit_s.observe(rep.emit_s)
            fault_point("after_emit")  # test-only (devtools/faults.py); no-op in production
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
    async def _apply_turns(self, due: list[_Due], out: list[OutMessage], acks: dict[ConversationRef, list[int]],
                           rep: BatchReport) -> None:
        """Apply a list of turn events (any conversations, in record order); retried for the
        conversations whose checkpoint another writer advanced meanwhile."""
        for attempt in range(5):
            conflicted = await self._apply_once(due, out, acks, rep)
            if not conflicted:
                return
            rep.conflicts += len(conflicted)
            self.metrics.conflicts.inc(len(conflicted))
            due = [d for d in due if d.ref in conflicted]
            log.info("re-reading %d conversation(s) after checkpoint conflicts (attempt %d)", len(conflicted), attempt + 1)
        raise RuntimeError(f"checkpoint conflicts did not settle for {sorted({str(d.ref) for d in due})}")

    async def _apply_once(self, due: list[_Due], out: list[OutMessage], acks: dict[ConversationRef, list[int]],
                          rep: BatchReport) -> set[ConversationRef]:
        refs = list(dict.fromkeys(d.ref for d in due))
        partitions = {d.ref: d.record.partition for d in due}
        t = time.perf_counter()
        views, problems = await self._load_views(refs)
        rep.load_s += time.perf_counter() - t
        self.metrics.load_s.observe(time.perf_counter() - t)

        # --- what is due: order, duplicates, gaps, limits ---------------------------------
        last_seq = {ref: v.seq for ref, v in views.items()}
        todo: list[_Due] = []
        for d in due:
            ev, ref = d.event, d.ref
            if ref in problems:
                self._quarantined(d, problems[ref], out, rep)
                continue
            view = views[ref]
            pos = (d.record.partition, d.record.offset)
            if view.gen_start and pos[0] == view.gen_start[0] and pos[1] < view.gen_start[1]:
                # published before the live generation began (before its delete): a replay of
                # an earlier generation, never applied to this one
                self.metrics.after_delete.inc()
                rep.duplicates += 1
                self.metrics.duplicates.inc()
                continue
            if (view.fresh and view.deleted_at and not view.restarted and pos[0] == view.deleted_at[0]
                    and pos[1] > view.deleted_at[1] and ev.seq <= last_seq[ref]):
                # published after the delete under the same id, restarting its seqs: a new
                # conversation (replays of the deleted turns sit before the delete, not after)
                view.restarted = True
                view.state.seq = NO_SEQ
                last_seq[ref] = NO_SEQ
            if ev.seq <= last_seq[ref]:
                stored = view.outbox.get(ev.seq)
                if stored is not None:
                    out.append(OutMessage(self.settings.embeddings_topic, ref.conversation_id.encode(), stored))
                    acks[ref].append(ev.seq)
                    rep.reemitted += 1
                    self.metrics.reemitted.inc()
                if view.origin is MemoryOrigin.RESET_AFTER_DELETE and view.fresh:
                    # published before the delete, replayed after it: its memory is erased
                    self.metrics.after_delete.inc()
                rep.duplicates += 1
                self.metrics.duplicates.inc()
                continue
            n_tok = self.engine.turn_tokens(ev.to_turn_input())
            if n_tok > self.settings.max_turn_tokens:
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.TURN_TOO_LONG,
                    reason=f"turn has {n_tok} tokens; the limit (max_turn_tokens) is {self.settings.max_turn_tokens}"), rep))
                continue
            if ev.seq > last_seq[ref] + 1 and not (view.fresh and last_seq[ref] == NO_SEQ):
                if self.settings.gap_policy is GapPolicy.DEAD_LETTER:
                    rejected = await self._with_store(lambda r=ref: self.store.note_gap_rejected(r), "gap count")
                    if rejected <= self.settings.gap_max_dead_letters:
                        out.append(self._dead_letter(d.record, Rejection(
                            reason_code=DeadLetterReason.SEQ_GAP,
                            reason=(f"seq {ev.seq} after {last_seq[ref]}: turns {last_seq[ref] + 1}..{ev.seq - 1} are "
                                    f"missing ({rejected} of at most {self.settings.gap_max_dead_letters} gapped "
                                    f"turns dead-lettered before the conversation continues without them)")), rep))
                        continue
                    self.metrics.gap_rebased.inc()
                    log.warning("conversation %s: %d gapped turns dead-lettered; continuing at seq %d without "
                                "turns %d..%d", ref, rejected - 1, ev.seq, last_seq[ref] + 1, ev.seq - 1)
                rep.gaps += 1
                self.metrics.gaps.inc()
                log.warning("conversation %s: seq gap, applying %d after %d", ref, ev.seq, last_seq[ref],
                            extra=log_fields(conversation_id=ref.conversation_id, tenant=ref.tenant, seq=ev.seq,
                                             topic=d.record.topic, partition=d.record.partition,
                                             offset=d.record.offset))
            last_seq[ref] = ev.seq
            todo.append(d)
        if not todo:
            return set()

        # --- step --------------------------------------------------------------------------
        states = {ref.tag: views[ref].state for ref in {d.ref for d in todo}}
        t = time.perf_counter()
        outputs = await self._step(states, todo, out, rep)
        rep.step_s += time.perf_counter() - t
        self.metrics.step_s.observe(time.perf_counter() - t)
        self.metrics.batch_size.observe(len(todo))
        if not outputs:
            return set()

        # --- checkpoint (state deltas + outbox, CAS on (gen, seq)) ------------------------
        by_ref: dict[ConversationRef, list[tuple[_Due, TurnOutput, bytes]]] = defaultdict(list)
        step_ms = rep.step_s * 1000
        for d, o in outputs:
            view = views[d.ref]
            origin = view.origin if not by_ref[d.ref] else MemoryOrigin.CONTINUED
            by_ref[d.ref].append((d, o, self._embedding_bytes(d, o, origin, view.gen, step_ms, rep.load_s * 1000)))
        commits = []
        for ref, items in by_ref.items():
            first_rec, last_rec = items[0][0].record, items[-1][0].record
            v = views[ref]
            commits.append(TurnCommit(
                ref=ref, expected_seq=v.seq, expected_gen=v.gen, fresh=v.fresh, state=states[ref.tag],
                gen_start=(first_rec.partition, first_rec.offset) if v.fresh else None,
                deltas=[o.delta for _, o, _ in items], outbox={o.seq: b for _, o, b in items},
                source=SourceOffset(topic=last_rec.topic, partition=last_rec.partition, offset=last_rec.offset)))
        t = time.perf_counter()
        results = await self._with_store(lambda: self.store.commit(commits), "commit")
        rep.checkpoint_s += time.perf_counter() - t
        self.metrics.checkpoint_s.observe(time.perf_counter() - t)
        fault_point("after_checkpoint")  # test-only (devtools/faults.py); no-op in production

        conflicted: set[ConversationRef] = set()
        for res in results:
            ref = res.ref
            if res.applied:
                for d, o, b in by_ref[ref]:
                    out.append(OutMessage(self.settings.embeddings_topic, ref.conversation_id.encode(), b))
                    acks[ref].append(o.seq)
                origin = views[ref].origin
                self.metrics.memory_origin.labels(memory=origin.value).inc()
                if len(by_ref[ref]) > 1:
                    self.metrics.memory_origin.labels(memory=MemoryOrigin.CONTINUED.value).inc(len(by_ref[ref]) - 1)
                rep.applied += len(by_ref[ref])
                self.metrics.turns.inc(len(by_ref[ref]))
                v = views[ref]
                gen_start = (by_ref[ref][0][0].record.partition, by_ref[ref][0][0].record.offset) if v.fresh else v.gen_start
                self.cache.put(ref, states[ref.tag], partitions[ref], gen=res.gen, gen_start=gen_start)
            elif res.status in (CommitStatus.FINGERPRINT, CommitStatus.CORRUPT):
                self.cache.discard(ref)
                code = (DeadLetterReason.FINGERPRINT_MISMATCH if res.status is CommitStatus.FINGERPRINT
                        else DeadLetterReason.CHECKPOINT_CORRUPT)
                problem = MemoryProblem(ref, code, f"commit refused: {res.status.value}")
                for d, _, _ in by_ref[ref]:
                    self._quarantined(d, problem, out, rep)
            else:  # STALE: the view changed (another writer, a delete); our in-memory state is void
                self.cache.discard(ref)
                conflicted.add(ref)
        return conflicted

    async def _step(self, states: dict[str, ConversationState], todo: list[_Due], out: list[OutMessage],
                    rep: BatchReport) -> list[tuple[_Due, TurnOutput]]:
        """Run the engine off the event loop. If the batch fails as a whole, isolate the turn
        that fails alone (dead-lettered as processing_error) instead of stalling the partition.
        States touched by a failed step are re-read from Redis, the source of truth, rather
        than copied before every step (that copy would cost megabytes per batch).

        The engine sees each conversation by its opaque tag (a hash of tenant + id), so two
        tenants' conversations with one id never share a state inside a step."""
        turns = [self._engine_turn(d) for d in todo]
        loop = asyncio.get_running_loop()
        try:
            outs = await loop.run_in_executor(self.executor, self.engine.step, states, turns)
            fault_point("in_step")  # test-only: states advanced in memory, nothing persisted
            return list(zip(todo, outs))
        except Exception:
            log.exception("model step failed for a batch of %d turns; retrying them one by one", len(todo))
        refs = {d.ref for d in todo}
        await self._reload(states, refs)
        result: list[tuple[_Due, TurnOutput]] = []
        broken: set[ConversationRef] = set()
        for d, turn in zip(todo, turns):
            ref, tag = d.ref, turn.conversation_id
            if ref in broken:  # later turns of a conversation whose turn failed: memory would skip it
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR,
                    reason="an earlier turn of this conversation in the same batch failed in the model step"), rep))
                continue
            try:
                o = await loop.run_in_executor(self.executor, self.engine.step, {tag: states[tag]}, [turn])
                result.append((d, o[0]))
            except Exception as exc:  # noqa: BLE001 - reported with the record
                log.exception("model step failed for %s seq %d", ref, turn.seq)
                broken.add(ref)
                out.append(self._dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR, reason=f"model step failed: {type(exc).__name__}: {exc}"), rep))
                # its earlier turns of this batch still commit; drop what the failed step half-did
                done = [o for dd, o in result if dd.ref == ref]
                await self._reload(states, {ref})
                for o in done:
                    states[tag].apply(o.delta)
        return result

    @staticmethod
    def _engine_turn(d: _Due) -> TurnInput:
        return d.event.to_turn_input().model_copy(update={"conversation_id": d.ref.tag})

    async def _reload(self, states: dict[str, ConversationState], refs: set[ConversationRef]) -> None:
        for ref in refs:
            self.cache.discard(ref)
        views, _ = await self._load_views(list(refs))
        for ref, v in views.items():
            states[ref.tag] = v.state

    # ------------------------------------------------------------------------------------------
    async def _load_views(self, refs: list[ConversationRef]
                          ) -> tuple[dict[ConversationRef, _View], dict[ConversationRef, MemoryProblem]]:
        views: dict[ConversationRef, _View] = {}
        missing = []
        for ref in refs:
            e = self.cache.entry(ref)
            if e is None:
                missing.append(ref)
                self.metrics.cache_misses.inc()
            else:
                views[ref] = _View(e.state, e.gen, e.state.seq, MemoryOrigin.CONTINUED, fresh=False,
                                   gen_start=e.gen_start)
                self.metrics.cache_hits.inc()
        problems: dict[ConversationRef, MemoryProblem] = {}
        if missing:
            loaded = await self._with_store(lambda: self.store.load_many(missing), "load")
            for ref, got in loaded.items():
                if isinstance(got, MemoryProblem):
                    problems[ref] = got
                else:
                    # a cached state has no pending outbox we do not already know about:
                    # events are emitted in the batch that commits them
                    views[ref] = _View(got.state, got.gen, got.seq, got.origin, fresh=not got.live,
                                       outbox=got.outbox, gap_rejects=got.gap_rejects, gen_start=got.gen_start,
                                       deleted_at=got.deleted_at)
        return views, problems

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
                await self.store.server.wait_until_available()

    async def _delete(self, ev: ConversationDelete, ref: ConversationRef, rec: InboundRecord,
                      rep: BatchReport) -> OutMessage | None:
        """Tombstone the conversation (see stream/state/store.py): its state is dropped and no
        writer that computed a turn before the delete can commit it afterwards. A replayed
        delete older than the conversation's live generation is ignored (None)."""
        self.cache.discard(ref)
        try:
            _existed, through = await self._with_store(
                lambda: self.store.delete(ref, at=(rec.partition, rec.offset)), "delete")
        except StaleDelete:
            log.info("conversation %s: replayed delete at %s/%d@%d predates its live generation; ignored",
                     ref, rec.topic, rec.partition, rec.offset)
            return None
        self.cache.discard(ref)
        rep.deleted += 1
        self.metrics.deletes.inc()
        tomb = ConversationDeleted(conversation_id=ref.conversation_id,
                                   deleted_through_seq=through if through >= 0 else None,
                                   at=datetime.now(timezone.utc), tenant=ref.tenant)
        return OutMessage(self.settings.embeddings_topic, ref.conversation_id.encode(), tomb.model_dump_json().encode())

    def _quarantined(self, d: _Due, problem: MemoryProblem, out: list[OutMessage], rep: BatchReport) -> None:
        """A turn of a conversation that cannot be continued: dead-lettered with the reason,
        counted; the rest of the batch (and the partition) flows on."""
        self.metrics.quarantined.labels(reason=problem.code.value).inc()
        hint = (" (see `evostream inspect`; `evostream reset` starts it over, then replay its dead letters)"
                if problem.code is DeadLetterReason.CHECKPOINT_CORRUPT else "")
        out.append(self._dead_letter(d.record, Rejection(
            reason_code=problem.code, reason=f"conversation {d.ref}: {problem.detail}{hint}"), rep))

    def _dead_letter(self, rec: InboundRecord, rej: Rejection, rep: BatchReport) -> OutMessage:
        code = rej.reason_code.value
        rep.dead_letters[code] = rep.dead_letters.get(code, 0) + 1
        self.metrics.dead_letters.labels(reason=code).inc()
        log.warning("dead-letter %s/%d@%d: %s: %s", rec.topic, rec.partition, rec.offset, code, rej.reason[:200],
                    extra=log_fields(topic=rec.topic, partition=rec.partition, offset=rec.offset, reason_code=code,
                                     conversation_id=rec.key.decode("utf-8", "replace") if rec.key else None))
        dl = make_dead_letter(rej, rec.key, rec.value, rec.topic, rec.partition, rec.offset, rec.timestamp_ms,
                              self.settings.worker_id, broker_limit=self.settings.kafka_max_message_bytes)
        return OutMessage(self.settings.dead_letter_topic, rec.key if rec.key else None, dl.model_dump_json().encode())

    def _embedding_bytes(self, d: _Due, o: TurnOutput, memory: MemoryOrigin, gen: int, step_ms: float,
                         load_ms: float) -> bytes:
        rec = d.record
        queue_ms = max(0.0, time.time() * 1000 - rec.timestamp_ms) if rec.timestamp_ms and rec.timestamp_ms > 0 else 0.0
        ev = EmbeddingEvent(
            conversation_id=d.ref.conversation_id, seq=o.seq, vector=encode_vector(o.embedding),
            dim=int(o.embedding.shape[0]), model=self.engine.model_name[:256] or "evoembedding",
            checkpoint=self.engine.fingerprint, memory_len=o.memory_len, memory=memory, generation=gen,
            tenant=d.ref.tenant,
            source=SourceRef(topic=rec.topic, partition=rec.partition, offset=rec.offset),
            timings=StageTimings(queue_ms=queue_ms, step_ms=step_ms, checkpoint_ms=load_ms),
            produced_at=datetime.now(timezone.utc),
        )
        return ev.model_dump_json().encode()
