"""One micro-batch, top to bottom: decode -> admit -> model step -> checkpoint -> emit -> acknowledge.

    records --decode--> turns and deletes (bad records: dead letters with the reason)
            --views-->  where each conversation stands (state cache, else Redis)
            --admit-->  which turns apply (order, replays, gaps, limits: admission.py)
            --step-->   embeddings and advanced memories (the engine, off the event loop: step.py)
            --commit--> checkpoint, emit, clear the outbox, acknowledge (commit.py: the order
                        that makes a crash anywhere harmless)

A conversation is (tenant, conversation id) everywhere (`stream.identity`). One whose stored
memory is corrupt, foreign or another identity's is quarantined: its turns are dead-lettered
with the reason and every other conversation in the batch flows on. A delete is applied where
it stands in the batch: the turns of its conversation before it are applied first.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from datetime import datetime, timezone

from schemas.events import (
    ConversationDelete,
    ConversationDeleted,
    DeadLetterReason,
    EmbeddingEvent,
    MemoryOrigin,
    SourceRef,
    StageTimings,
)
from schemas.vectors import encode_vector
from stream.identity import ConversationRef
from stream.kafka.emitter import OutMessage
from stream.processing.admission import Admission, turn_digest
from stream.processing.commit import BatchCommit, Emitter
from stream.processing.dead_letters import DeadLetterWriter, Rejection
from stream.processing.decode import decode_inbound
from stream.processing.input_shapes import InputShapes
from stream.processing.outage import PauseOnOutage
from stream.processing.records import BatchReport, Due, InboundRecord, conversation_ref
from stream.processing.step import ModelStep
from stream.processing.views import View, ViewLoader
from stream.runtime.metrics import Metrics
from stream.settings import Settings
from stream.state.cache import StateCache
from stream.state.errors import StaleDelete
from stream.state.records import CommitStatus, MemoryProblem, SourceOffset, TurnCommit
from stream.state.store import MemoryStore
from workers.engine import EvoEngine, TurnOutput

log = logging.getLogger(__name__)

Acknowledge = Callable[[list[InboundRecord]], Awaitable[None]]


class TurnPipeline:
    def __init__(self, engine: EvoEngine, store: MemoryStore, emitter: Emitter, settings: Settings,
                 executor: Executor, metrics: Metrics | None = None, cache: StateCache | None = None,
                 *, embed: bool = True):
        self.engine = engine
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.cache = cache if cache is not None else StateCache(settings.cache_max_bytes)
        self.input_shapes = InputShapes(self.metrics.registry)  # tolerant reader counters (issue #13)
        self.guard = PauseOnOutage(store, self.metrics, retry_max_s=settings.store_retry_backoff_max_s)
        self.guard.on_new_store.append(self._forget_store)  # issue #17: a lost store was replaced
        self.views = ViewLoader(self.cache, store, self.guard, self.metrics)
        self.dead_letter = DeadLetterWriter(topic=settings.dead_letter_topic, worker=settings.worker_id,
                                            broker_limit=settings.kafka_max_message_bytes, metrics=self.metrics)
        self.admission = Admission(settings, engine.turn_tokens, store, self.guard, self.dead_letter, self.metrics)
        # embed=False (a rebuild, issue #17): memories only; no embedding is computed or written
        self.step = ModelStep(engine, executor, self.views, self.dead_letter, embed=embed)

    def _forget_store(self) -> None:
        """After a lost store is trusted again (restored, rebuilt, or its loss accepted):
        nothing this worker cached from before may be committed against it."""
        self.cache.clear()
        self.store.planner.counts = type(self.store.planner.counts)()

    @property
    def paused(self) -> bool:
        """Holding a batch while Redis is unavailable (readiness reports it)."""
        return self.guard.paused

    # ------------------------------------------------------------------------------------------
    async def process(self, records: list[InboundRecord], acknowledge: Acknowledge | None = None) -> BatchReport:
        """Handle one batch completely; returns only when its outputs are durable and, with
        `acknowledge`, after the records were acknowledged. Never raises for bad input;
        retries (pausing) while Redis or the broker are unavailable."""
        t0 = time.perf_counter()
        rep = BatchReport(records=len(records))
        self.metrics.records.inc(len(records))
        batch = BatchCommit(records, self.store, self.emitter, self.guard, self.settings.embeddings_topic,
                            self.metrics, rep)
        phase: list[Due] = []
        pending: set[ConversationRef] = set()
        for rec in records:
            ev = decode_inbound(rec.key, rec.value, max_bytes=self.settings.max_record_bytes,
                                max_depth=self.settings.max_json_depth, strict=self.settings.input_strict)
            if isinstance(ev, Rejection):
                batch.send(self.dead_letter(rec, ev, rep))
                continue
            self.input_shapes.observe(ev)
            ref = conversation_ref(ev)
            if isinstance(ev, ConversationDelete):
                if ref in pending:  # keep a delete ordered after its turns
                    await self._apply_turns(phase, batch, rep)
                    phase, pending = [], set()
                await self._delete(ev, ref, rec, batch, rep)
            elif not ev.has_text:  # only messages the model does not read (issue #13)
                self.input_shapes.turn_without_text(ev)
            else:
                phase.append(Due(rec, ev, ref))
                pending.add(ref)
        if phase:
            await self._apply_turns(phase, batch, rep)
        await batch.finish(acknowledge)

        now_ms = time.time() * 1000
        for rec in records:
            if rec.timestamp_ms and rec.timestamp_ms > 0:
                self.metrics.turn_latency_s.observe(max(0.0, (now_ms - rec.timestamp_ms) / 1000))
        self.metrics.batch_s.observe(time.perf_counter() - t0)
        self.metrics.cache_bytes.set(self.cache.bytes)
        self.metrics.cache_entries.set(len(self.cache))
        return rep

    # ------------------------------------------------------------------------------------------
    async def _apply_turns(self, due: list[Due], batch: BatchCommit, rep: BatchReport) -> None:
        """Apply a list of turn events (any conversations, in record order); retried for the
        conversations whose memory state another writer advanced meanwhile."""
        for attempt in range(5):
            conflicted = await self._apply_once(due, batch, rep)
            if not conflicted:
                return
            rep.conflicts += len(conflicted)
            self.metrics.conflicts.inc(len(conflicted))
            due = [d for d in due if d.ref in conflicted]
            log.info("re-reading %d conversation(s) after commit conflicts (attempt %d)", len(conflicted), attempt + 1)
        raise RuntimeError(f"commit conflicts did not settle for {sorted({str(d.ref) for d in due})}")

    async def _apply_once(self, due: list[Due], batch: BatchCommit, rep: BatchReport) -> set[ConversationRef]:
        t = time.perf_counter()
        views, problems = await self.views.load(list(dict.fromkeys(d.ref for d in due)))
        rep.load_s += time.perf_counter() - t
        self.metrics.load_s.observe(time.perf_counter() - t)

        todo = await self.admission.admit(due, views, problems, batch, rep)
        if not todo:
            return set()

        states = {ref.tag: views[ref].state for ref in {d.ref for d in todo}}
        t = time.perf_counter()
        outputs = await self.step(states, todo, batch, rep)
        rep.step_s += time.perf_counter() - t
        self.metrics.step_s.observe(time.perf_counter() - t)
        self.metrics.batch_size.observe(len(todo))
        if not outputs:
            return set()

        by_ref: dict[ConversationRef, list[tuple[Due, TurnOutput]]] = defaultdict(list)
        for d, o in outputs:
            by_ref[d.ref].append((d, o))
        commits = [self._turn_commit(ref, items, views[ref], states[ref.tag], rep) for ref, items in by_ref.items()]
        results = await batch.checkpoint(commits)

        conflicted: set[ConversationRef] = set()
        for res in results:
            ref, items, view = res.ref, by_ref[res.ref], views[res.ref]
            if res.applied:
                self.metrics.memory_origin.labels(memory=view.origin.value).inc()
                if len(items) > 1:
                    self.metrics.memory_origin.labels(memory=MemoryOrigin.CONTINUED.value).inc(len(items) - 1)
                rep.applied += len(items)
                self.metrics.turns.inc(len(items))
                first = items[0][0].record
                gen_start = (first.partition, first.offset) if view.fresh else view.gen_start
                self.cache.put(ref, states[ref.tag], first.partition, gen=res.gen, gen_start=gen_start)
            elif res.status in (CommitStatus.FINGERPRINT, CommitStatus.CORRUPT):
                self.cache.discard(ref)
                code = (DeadLetterReason.FINGERPRINT_MISMATCH if res.status is CommitStatus.FINGERPRINT
                        else DeadLetterReason.CHECKPOINT_CORRUPT)
                problem = MemoryProblem(ref, code, f"commit refused: {res.status.value}")
                for d, _ in items:
                    await self.admission.quarantine(d, problem, batch, rep)
            else:  # STALE: the view changed (another writer, a delete); our in-memory state is void
                self.cache.discard(ref)
                conflicted.add(ref)
        return conflicted

    def _turn_commit(self, ref: ConversationRef, items: list[tuple[Due, TurnOutput]], view: View,
                     state: object, rep: BatchReport) -> TurnCommit:
        """One conversation's part of the batch: its state after the turns, their deltas and
        their events (the outbox), and the (gen, seq) the turns were computed from."""
        first, last = items[0][0].record, items[-1][0].record
        step_ms, load_ms = rep.step_s * 1000, rep.load_s * 1000
        outbox = {}
        for i, (d, o) in enumerate(items):
            if o.embedding is None:  # embed=False: a rebuild writes memories only
                continue
            origin = view.origin if i == 0 else MemoryOrigin.CONTINUED
            if origin is MemoryOrigin.NEW and d.event.seq > 0 and self._loss_accepted():
                origin = MemoryOrigin.RESET_BY_OPERATOR  # issue #17: its earlier turns may have been applied
            outbox[o.seq] = self._embedding_bytes(d, o, origin, view.gen, step_ms, load_ms)
        return TurnCommit(
            ref=ref, expected_seq=view.seq, expected_gen=view.gen, fresh=view.fresh, state=state,
            gen_start=(first.partition, first.offset) if view.fresh else None,
            deltas=[o.delta for _, o in items], outbox=outbox,
            ledger={o.seq: turn_digest(d.event) for d, o in items},
            source=SourceOffset(topic=last.topic, partition=last.partition, offset=last.offset))

    def _loss_accepted(self) -> bool:
        """The store is an operator's fresh start after a loss (`evostream store accept-loss`)."""
        known = getattr(getattr(self.store, "epoch", None), "known", None)
        return known is not None and known.decision.value == "accept_loss"

    async def _delete(self, ev: ConversationDelete, ref: ConversationRef, rec: InboundRecord, batch: BatchCommit,
                      rep: BatchReport) -> None:
        """Tombstone the conversation (stream/state/store.py): its state is dropped and no
        writer that computed a turn before the delete can commit it afterwards. A replayed
        delete older than the conversation's live generation is ignored."""
        self.cache.discard(ref)
        batch.sealed = False  # the watermarks must follow this write (commit.py)
        try:
            _existed, through = await self.guard(
                lambda: self.store.delete(ref, at=(rec.partition, rec.offset)), "delete")
        except StaleDelete:
            log.info("conversation %s: replayed delete at %s/%d@%d predates its live generation; ignored",
                     ref, rec.topic, rec.partition, rec.offset)
            return
        self.cache.discard(ref)
        rep.deleted += 1
        self.metrics.deletes.inc()
        tomb = ConversationDeleted(conversation_id=ref.conversation_id,
                                   deleted_through_seq=through if through >= 0 else None,
                                   at=datetime.now(timezone.utc), tenant=ref.tenant)
        batch.send(OutMessage(self.settings.embeddings_topic, ref.conversation_id.encode(),
                              tomb.model_dump_json().encode()))

    def _embedding_bytes(self, d: Due, o: TurnOutput, memory: MemoryOrigin, gen: int, step_ms: float,
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
