"""Re-derive memories from the turns topic (`evostream rebuild`, issue #17).

Kafka Streams restores a state store from its changelog topic; here the turns topic is the
log. A rebuild reads it (all conversations, one tenant or one conversation, from the start of
what the topic retains or from a time) and feeds it through the live pipeline itself
(TurnPipeline: the same decoding, admission rules on order, seqs, deletes and gaps, the same
engine and the same compare-and-set commits), into a namespace of its own, so that live traffic
is not disturbed until an operator switches workers over (README "When the store is wrong").

* **Through what the group acknowledged.** By default each partition is rebuilt through the
  consumer group's committed offset: the turns after it are processed by the workers after the
  switch, as usual, and so get their embeddings emitted. (`through="end"`: to the topic's end,
  for a namespace nobody will switch to, e.g. a comparison.)
* **Exact or batched.** `exact` (the default) steps each turn alone, in record order, which is
  bit-for-bit what an offline replay of the conversation computes; `batched` uses the live
  micro-batches (faster, equal within the batching tolerance, see tests/test_chaos.py TOL).
  Either way no embedding is computed (`embed=False`): a rebuild writes memories only.
* **Resumable.** The target namespace's watermarks (stream/state/epoch.py) are advanced by
  every batch like a worker's; a rebuild started again resumes after them. The namespace's
  identity says `status: building` until a pass completes: workers do not serve from it
  meanwhile.
* **Progress** is reported every `progress_every_s` with the rate and the time left.

Retention: a rebuild can only re-derive what the topic still holds. A partition whose log
starts after offset 0 lost its oldest turns to retention (`retained_from` in the report):
their conversations are rebuilt from the first retained turn, a shorter memory than the live
one had. Keep the turns topic's retention at least the memory's horizon, or compact it and
restore a snapshot first (`from_time` = when the snapshot was taken).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel

from stream.kafka.emitter import OutMessage
from stream.kafka.group_offsets import committed_offsets
from stream.processing.pipeline import TurnPipeline
from stream.processing.records import InboundRecord
from stream.runtime.metrics import Metrics
from stream.settings import Settings
from stream.state.cache import StateCache
from stream.state.epoch import Decision, EpochInfo, StoreMismatch, new_identity
from stream.state.store import MemoryStore
from workers.engine import EvoEngine, TurnOutput


class RebuildError(RuntimeError):
    """A rebuild that cannot start or go on (another model's namespace, a missing topic)."""


class OneTurnAtATime:
    """The engine, stepping each turn alone (in the given order): what an offline replay of a
    conversation computes, bit for bit. Batching rows of other conversations changes the
    padded shapes of the passes, and with them the last bits of the floats."""

    def __init__(self, engine: EvoEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self, states: dict, turns: list, *, embed: bool = True) -> list[TurnOutput]:
        out: list[TurnOutput] = []
        for t in turns:
            st = states.get(t.conversation_id)
            one = {t.conversation_id: st if st is not None else self._engine.new_state()}
            out += self._engine.step(one, [t], embed=embed)
            states[t.conversation_id] = one[t.conversation_id]
        return out


class Sink:
    """The rebuild's emitter: nothing is published (the workers published it when it was
    live); dead letters and tombstones are counted."""

    def __init__(self) -> None:
        self.messages = 0

    async def send_all(self, messages: list[OutMessage]) -> None:
        self.messages += len(messages)


class Scope(BaseModel):
    tenant: str | None = None
    conversation: str | None = None

    @property
    def name(self) -> str:
        if self.conversation is not None:
            return f"conversation:{self.tenant or ''}/{self.conversation}"
        if self.tenant is not None:
            return f"tenant:{self.tenant}"
        return "all"

    def wants(self, value: bytes | None) -> bool:
        """Does this record belong to the scope? (Unreadable records never do, except in
        scope "all", where the pipeline dead-letters them like a worker would.)"""
        if self.name == "all":
            return True
        try:
            doc = json.loads(value or b"")
        except ValueError:
            return False
        if not isinstance(doc, dict) or (doc.get("tenant") or None) != self.tenant:
            return False
        return self.conversation is None or doc.get("conversation_id") == self.conversation


class RebuildReport(BaseModel):
    namespace: str
    scope: str
    mode: str
    identity: str
    records: int = 0
    turns_applied: int = 0
    duplicates: int = 0
    deleted: int = 0
    dead_letters: dict[str, int] = {}
    seconds: float = 0.0
    turns_per_s: float = 0.0
    records_per_s: float = 0.0
    resumed_from: dict[str, int] = {}
    through: dict[str, int] = {}
    retained_from: dict[str, int] = {}
    complete: bool = False


@dataclass
class Plan:
    start: dict[int, int] = field(default_factory=dict)  # partition -> first offset to read
    last: dict[int, int] = field(default_factory=dict)   # partition -> last offset to rebuild
    retained_from: dict[int, int] = field(default_factory=dict)
    nothing: set[int] = field(default_factory=set)  # partitions with nothing to read (e.g. after from_time)

    @property
    def total(self) -> int:
        return sum(max(0, self.last[p] - self.start[p] + 1) for p in self.last)


class Rebuild:
    def __init__(self, settings: Settings, engine: EvoEngine, *, into: str, scope: Scope = Scope(),
                 from_time: datetime | None = None, through: str = "committed", mode: str = "exact",
                 batch_records: int = 256, progress: Callable[[str], None] | None = None,
                 progress_every_s: float = 2.0, client_kwargs: dict[str, Any] | None = None,
                 store: MemoryStore | None = None) -> None:
        if through not in ("committed", "end") or mode not in ("exact", "batched"):
            raise ValueError(f"through={through!r} mode={mode!r}")
        self.s = settings.model_copy(update={"redis_namespace": into})
        self.engine = engine
        self.scope, self.from_time, self.through, self.mode = scope, from_time, through, mode
        self.batch_records = batch_records
        self.progress = progress or (lambda line: None)
        self.progress_every_s = progress_every_s
        self.client_kwargs = client_kwargs or {}
        self.store = store or self._store()
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rebuild-model")
        stepper = OneTurnAtATime(engine) if mode == "exact" else engine
        self.pipeline = TurnPipeline(stepper, self.store, Sink(), self.s, self.executor, self.metrics,  # type: ignore[arg-type]
                                     cache=StateCache(self.s.cache_max_bytes), embed=False)

    def _store(self) -> MemoryStore:
        from stream.state.cold_tier import store_levers
        from stream.state.redis_client import RedisOptions

        s, e = self.s, self.engine
        levers = store_levers(s)
        levers.pop("cold", None)  # the live cold tier holds the live namespace's conversations
        return MemoryStore(s.redis_url, fingerprint=e.fingerprint, hidden_size=e.hidden_size, capacity=e.capacity,
                           dtype=e.state_dtype, namespace=s.redis_namespace, ttl_s=s.state_ttl_s,
                           marker_ttl_s=s.marker_ttl_s, compact_every=s.compact_every,
                           writer_id=f"rebuild-{uuid.uuid4().hex[:8]}", durability=s.redis_durability,
                           durability_replicas=s.redis_durability_replicas,
                           durability_timeout_ms=s.redis_durability_timeout_ms,
                           redis_options=RedisOptions.from_settings(s), **levers)

    # --- the target namespace --------------------------------------------------------------------
    async def _open_target(self) -> EpochInfo:
        """Create the namespace's identity (status building), or resume one of the same model,
        precision and scope."""
        watch = self.store.epoch
        watch.building_ok = True  # our own "building" is not a reason to hold
        mine = new_identity(fingerprint=self.store.fingerprint, dtype=self.store.storage_dtype_name(),
                            created_by=self.store.writer_id, status="building", scope=self.scope.name,
                            decision=Decision.REBUILT)
        info = await watch.epoch.read()
        if info is None:
            await watch.epoch.write(mine, expect=None)
            info = await watch.epoch.read()
            assert info is not None
        if (info.fingerprint, info.dtype, info.scope) != (mine.fingerprint, mine.dtype, mine.scope):
            raise StoreMismatch(
                f"namespace {self.s.redis_namespace!r} holds memories of model {info.fingerprint} in {info.dtype} "
                f"(scope {info.scope}); this rebuild is {mine.fingerprint} in {mine.dtype} (scope {mine.scope}): "
                f"rebuild into another namespace")
        if info.status != "building":
            await watch.epoch.set_status("building")
            info = await watch.epoch.read()
            assert info is not None
        watch.known, watch.opened = info, True
        return info

    # --- what to read ----------------------------------------------------------------------------
    async def _plan(self, consumer: AIOKafkaConsumer, info: EpochInfo) -> Plan:
        topic = self.s.turns_topic
        if topic not in await consumer.topics():
            raise RebuildError(f"topic {topic!r} does not exist on {self.s.kafka_bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        if self.through == "committed":
            committed = await committed_offsets(self.s.kafka_bootstrap, self.s.group_id, topic,
                                                client_kwargs=self.client_kwargs)
            lasts = {tp.partition: committed.get((topic, tp.partition), 0) - 1 for tp in tps}
        else:
            lasts = {tp.partition: ends[tp] - 1 for tp in tps}
        froms: dict[int, int] = {}
        if self.from_time is not None:
            found = await consumer.offsets_for_times({tp: int(self.from_time.timestamp() * 1000) for tp in tps})
            # no record at or after the time (None; tansu answers offset 0 with timestamp -1):
            # nothing to read there (not "from the end offset", which a broker may undercount)
            froms = {tp.partition: (o.offset if o is not None and o.timestamp >= 0 else -1) for tp, o in found.items()}
        plan = Plan()
        for tp in tps:
            p = tp.partition
            start = max(begins[tp], froms.get(p, 0), info.watermarks.get((topic, p), -1) + 1)
            plan.start[p], plan.last[p] = start, lasts[p]
            if froms.get(p) == -1:
                plan.start[p], plan.last[p] = 0, -1
                plan.nothing.add(p)
            if begins[tp] > 0:
                plan.retained_from[p] = begins[tp]
        if self.through == "end":
            await self._true_ends(consumer, plan)
        return plan

    async def _true_ends(self, consumer: AIOKafkaConsumer, plan: Plan) -> None:
        """The last offset of each partition, from fetch responses (their high watermark).
        Why not ListOffsets alone: a broker may answer it from record-batch boundaries (tansu
        answers the last batch's base offset + 1), which undercounts a batch of many records."""
        topic = self.s.turns_topic
        tps = [TopicPartition(topic, p) for p in plan.start if p not in plan.nothing]
        if not tps:
            return
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, plan.start[tp.partition])
        pending = set(tps)
        deadline = time.monotonic() + 2.0
        while pending and time.monotonic() < deadline:
            got = await consumer.getmany(*pending, timeout_ms=500, max_records=1)
            for tp in list(got):
                hw = consumer.highwater(tp)
                if hw is not None:
                    plan.last[tp.partition] = max(plan.last[tp.partition], hw - 1)
                    pending.discard(tp)
        for tp in pending:  # nothing after the start offset
            plan.last[tp.partition] = min(plan.last[tp.partition], plan.start[tp.partition] - 1)
        consumer.unsubscribe()

    # --- the run ---------------------------------------------------------------------------------
    async def run(self) -> RebuildReport:
        info = await self._open_target()
        rep = RebuildReport(namespace=self.s.redis_namespace, scope=self.scope.name, mode=self.mode, identity=info.id)
        c = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_partition_fetch_bytes=max(1 << 20, 2 * self.s.max_record_bytes),
                             **self.client_kwargs)
        await c.start()
        t0 = time.monotonic()
        try:
            plan = await self._plan(c, info)
            topic = self.s.turns_topic
            rep.resumed_from = {str(p): o for p, o in plan.start.items() if (topic, p) in info.watermarks}
            rep.through = {str(p): o for p, o in plan.last.items()}
            rep.retained_from = {str(p): o for p, o in plan.retained_from.items()}
            todo = {p for p in plan.last if plan.start[p] <= plan.last[p]}
            if todo:
                tps = [TopicPartition(topic, p) for p in sorted(todo)]
                c.assign(tps)
                for tp in tps:
                    c.seek(tp, plan.start[tp.partition])
            await self._loop(c, plan, todo, rep, t0)
            rep.complete = True
            await self.store.epoch.epoch.set_status("ready")
        finally:
            await c.stop()
            rep.seconds = round(time.monotonic() - t0, 3)
            rep.turns_per_s = round(rep.turns_applied / rep.seconds, 1) if rep.seconds else 0.0
            rep.records_per_s = round(rep.records / rep.seconds, 1) if rep.seconds else 0.0
        return rep

    async def _loop(self, c: AIOKafkaConsumer, plan: Plan, todo: set[int], rep: RebuildReport, t0: float) -> None:
        topic, total = self.s.turns_topic, plan.total
        done_at = {p: plan.start[p] - 1 for p in plan.last}
        next_note = time.monotonic() + self.progress_every_s
        self.progress(f"rebuilding {total} record(s) of {topic} into {self.s.redis_namespace!r} "
                      f"({self.scope.name}, {self.mode})")
        if self.through == "committed" and not any(last >= 0 for last in plan.last.values()):
            self.progress(f"group {self.s.group_id!r} has acknowledged nothing on {topic}: nothing to rebuild through "
                          f"its offsets (--through end rebuilds the whole topic)")
        while todo:
            got = await c.getmany(*[TopicPartition(topic, p) for p in sorted(todo)], timeout_ms=1000,
                                  max_records=self.batch_records)
            records: list[InboundRecord] = []
            read_through: dict[tuple[str, int], int] = {}
            for tp, msgs in got.items():
                for m in msgs:
                    if m.offset > plan.last[tp.partition]:
                        break
                    read_through[(topic, tp.partition)] = m.offset
                    done_at[tp.partition] = m.offset
                    if self.scope.wants(m.value):
                        records.append(InboundRecord(topic, tp.partition, m.offset, m.key, m.value,
                                                     m.timestamp if m.timestamp and m.timestamp > 0 else None))
            rep.records += sum(1 for tp, msgs in got.items() for m in msgs if m.offset <= plan.last[tp.partition])
            if records:
                br = await self.pipeline.process(records)
                rep.turns_applied += br.applied
                rep.duplicates += br.duplicates
                rep.deleted += br.deleted
                for k, v in br.dead_letters.items():
                    rep.dead_letters[k] = rep.dead_letters.get(k, 0) + v
            if read_through:
                await self.pipeline.guard(lambda: self.store.advance(read_through), "watermark")
                self.store.epoch.note_acked(read_through)
            todo = {p for p in todo if done_at[p] < plan.last[p]}
            if time.monotonic() >= next_note or not todo:
                next_note = time.monotonic() + self.progress_every_s
                self.progress(self._line(rep, total, t0))

    @staticmethod
    def _line(rep: RebuildReport, total: int, t0: float) -> str:
        el = max(1e-9, time.monotonic() - t0)
        rate = rep.records / el
        left = max(0, total - rep.records)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * rep.records / total if total else 100.0
        return (f"{rep.records}/{total} records ({pct:.1f}%), {rep.turns_applied} turns applied, "
                f"{rep.turns_applied / el:.1f} turns/s, ETA {eta}")

    async def close(self) -> None:
        await self.store.close()
        self.executor.shutdown(wait=False)


async def run_rebuild(settings: Settings, engine: EvoEngine, **kw: Any) -> RebuildReport:
    rb = Rebuild(settings, engine, **kw)
    try:
        return await rb.run()
    finally:
        await rb.close()


__all__ = ["OneTurnAtATime", "Rebuild", "RebuildError", "RebuildReport", "Scope", "run_rebuild"]
