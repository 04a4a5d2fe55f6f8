"""What the sink does with each record, independent of the database: parse, then plan a batch.

The embeddings topic is applied in order, per conversation (its key), with these rules
(README "The vector sink"):

* an embedding is a row keyed by (tenant, conversation, generation, seq); a copy of it
  replaces the row (last write wins: copies are identical by contract);
* an embedding that STARTS a generation (`memory` is not `continued`: new, reset after a
  delete/expiry/operator reset) drops every row the conversation had: the index never mixes
  two lives of a conversation;
* a `continued` embedding drops rows of older generations (in case the generation's first
  turn never arrived, e.g. it was dead-lettered), and is refused (`stale_generation`, kept in
  the rejects table) when the conversation already holds rows of a newer generation;
* a `conversation_deleted` event, or a null-value record (a Kafka tombstone, see
  stream/kafka/connect.py), drops every row of the conversation (right to erasure);
* anything else is refused with a reason and kept in the rejects table (never lost, never
  fatal).

Why copies and replays are harmless: the emitter guarantees that the LAST copies of a
conversation's records are in the order they were made (stream/kafka/emitter.py), and every
rule above is a function of the record and the conversation's rows only, so applying the topic
again, or any suffix of it that starts at a stored offset, ends in the same table.

`plan()` folds one batch into the few statements a database needs (deletes of rows that
existed before the batch, then the final upserts), so a batch costs a handful of round trips
instead of one per record; `tests/test_sink_plan.py` checks it against the rules applied one
record at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, Sequence

import numpy as np
from pydantic import ValidationError

from schemas.events import OUTBOUND_EVENT_ADAPTER, ConversationDeleted, EmbeddingEvent, MemoryOrigin
from schemas.vectors import decode_vector
from stream.kafka.connect import HEADER_TENANT, HEADER_TYPE

ConvKey = tuple[str, str]                 # (tenant, conversation_id); the default tenant is ""
RowKey = tuple[str, str, int, int]        # (tenant, conversation_id, generation, seq)
Headers = Sequence[tuple[str, bytes]]


def tenant_key(tenant: str | None) -> str:
    """The stored form of a tenant: the default tenant is "" (a named tenant never is)."""
    return tenant or ""


# --------------------------------------------------------------------------- parsed records


@dataclass(frozen=True)
class TurnRow:
    """One row of the turns table: one turn's embedding in one generation of a conversation."""

    tenant: str
    conversation_id: str
    generation: int
    seq: int
    document_id: str
    memory_origin: str
    checkpoint: str
    model: str
    memory_len: int
    vector: np.ndarray = field(compare=False, repr=False)   # float32, as emitted (not normalised)
    produced_at: datetime
    turn_at: datetime            # the turn record's timestamp: produced_at - timings.queue_ms
    source_partition: int
    source_offset: int

    @property
    def key(self) -> RowKey:
        return (self.tenant, self.conversation_id, self.generation, self.seq)

    @property
    def conv(self) -> ConvKey:
        return (self.tenant, self.conversation_id)

    @classmethod
    def from_event(cls, ev: EmbeddingEvent) -> "TurnRow":
        return cls(tenant_key(ev.tenant), ev.conversation_id, ev.generation, ev.seq, ev.document_id,
                   ev.memory.value, ev.checkpoint, ev.model, ev.memory_len, decode_vector(ev.vector), ev.produced_at,
                   ev.produced_at - timedelta(milliseconds=ev.timings.queue_ms), ev.source.partition,
                   ev.source.offset)


@dataclass(frozen=True)
class Upsert:
    row: TurnRow

    @property
    def starts_generation(self) -> bool:
        return self.row.memory_origin != MemoryOrigin.CONTINUED.value


@dataclass(frozen=True)
class DeleteConversation:
    conv: ConvKey


@dataclass(frozen=True)
class Reject:
    """A record the sink cannot apply, kept with its reason (topic, partition, offset name it)."""

    topic: str
    partition: int
    offset: int
    reason: str
    detail: str
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Text:
    conv: ConvKey
    seq: int
    text: str


@dataclass(frozen=True)
class DeleteTexts:
    conv: ConvKey


Op = Upsert | DeleteConversation | Reject | Text | DeleteTexts


def _header(headers: Headers | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return v
    return None


def parse_embedding_record(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                           headers: Headers | None = None) -> Op:
    """One embeddings-topic record -> Upsert | DeleteConversation | Reject (never raises)."""
    def reject(reason: str, detail: str) -> Reject:
        return Reject(topic, partition, offset, reason, detail[:500], key, value)

    if value is None:
        # A Kafka tombstone (EVOSTREAM_OUTPUT_TOMBSTONES=null|both): the key is the conversation.
        if key is None:
            return reject("null_without_key", "a null-value record without a key names no conversation")
        kind = _header(headers, HEADER_TYPE)
        if kind not in (None, b"conversation_deleted"):
            return reject("unknown_null_record", f"null-value record of type {kind!r}")
        try:
            cid = key.decode("utf-8")
            raw_tenant = _header(headers, HEADER_TENANT)
            tenant = raw_tenant.decode("utf-8") if raw_tenant is not None else None
        except UnicodeDecodeError:
            return reject("invalid_utf8", "the key or the tenant header of a null-value record is not UTF-8")
        return DeleteConversation((tenant_key(tenant), cid))
    try:
        ev = OUTBOUND_EVENT_ADAPTER.validate_json(value)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return reject(str(first.get("type", "invalid")), f"{where + ': ' if where else ''}{first.get('msg', exc)}")
    if key is not None and key != ev.conversation_id.encode("utf-8"):
        return reject("key_mismatch", "the record key is not the event's conversation id")
    if isinstance(ev, ConversationDeleted):
        return DeleteConversation((tenant_key(ev.tenant), ev.conversation_id))
    return Upsert(TurnRow.from_event(ev))


def render_turn_text(messages: object) -> str | None:
    """The text of a turn event's messages, one "role: content" line each."""
    if not isinstance(messages, list):
        return None
    lines = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("role"), str):
            content = m.get("content")
            lines.append(f"{m['role']}: {content if isinstance(content, str) else json.dumps(content)}")
    return "\n".join(lines) or None


def parse_turn_record(key: bytes | None, value: bytes | None) -> Text | DeleteTexts | str:
    """One turns-topic record -> Text | DeleteTexts, or the reason it is not the sink's business
    (bad input on the turns topic is the workers' to dead-letter; the sink only counts it)."""
    try:
        obj = json.loads(value) if value else None
    except ValueError:
        return "invalid_json"
    if not isinstance(obj, dict) or not isinstance(obj.get("conversation_id"), str):
        return "not_a_turn"
    cid, tenant = obj["conversation_id"], obj.get("tenant")
    if key is None or key.decode("utf-8", "replace") != cid or not (tenant is None or isinstance(tenant, str)):
        return "key_mismatch"
    if obj.get("type") == "delete":
        return DeleteTexts((tenant_key(tenant), cid))
    if obj.get("type") == "turn" and isinstance(obj.get("seq"), int) and not isinstance(obj.get("seq"), bool):
        text = render_turn_text(obj.get("messages"))
        return Text((tenant_key(tenant), cid), obj["seq"], text) if text is not None else "no_text"
    return "not_a_turn"


# --------------------------------------------------------------------------- planning a batch


@dataclass
class BatchStats:
    records: int = 0
    upserts: int = 0
    deletes: int = 0
    texts: int = 0
    rejected: int = 0
    stale: int = 0
    ignored: dict[str, int] = field(default_factory=dict)   # turns-topic records that are not turns

    def ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1

    def add(self, other: "BatchStats") -> None:
        for name in ("records", "upserts", "deletes", "texts", "rejected", "stale"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.ignored.items():
            self.ignored[k] = self.ignored.get(k, 0) + v


@dataclass
class Plan:
    """The statements of one batch: run `row_deletes` and `text_deletes` first (they only
    concern rows that existed before the batch), then `upserts`, `texts`, `rejects` and the
    offsets, all in ONE transaction."""

    row_deletes: dict[ConvKey, set[int]] = field(default_factory=dict)   # generations to delete
    upserts: dict[RowKey, TurnRow] = field(default_factory=dict)
    text_deletes: set[ConvKey] = field(default_factory=set)
    texts: dict[tuple[str, str, int], str] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)     # (topic, partition) -> next offset
    stats: BatchStats = field(default_factory=BatchStats)


def conversations_of(ops: Iterable[Op]) -> set[ConvKey]:
    """The conversations whose stored generations `plan` needs to know."""
    out: set[ConvKey] = set()
    for op in ops:
        if isinstance(op, Upsert):
            out.add(op.row.conv)
        elif isinstance(op, DeleteConversation):
            out.add(op.conv)
    return out


def plan(ops: Iterable[tuple[str, int, int, Op | str]], stored: dict[ConvKey, set[int]]) -> Plan:
    """Fold a batch of (topic, partition, offset, op-or-ignore-reason) records, in topic order,
    into a `Plan`. `stored`: the generations each conversation of the batch has in the table
    before it (`conversations_of`; a conversation absent from it has none)."""
    p = Plan()
    pre: dict[ConvKey, set[int]] = {}                        # stored generations still standing
    pending: dict[ConvKey, dict[tuple[int, int], TurnRow]] = {}
    pending_texts: dict[ConvKey, dict[int, str]] = {}

    def pre_of(c: ConvKey) -> set[int]:
        if c not in pre:
            pre[c] = set(stored.get(c, ()))
        return pre[c]

    def drop_pre(c: ConvKey, gens: set[int]) -> None:
        if gens:
            p.row_deletes.setdefault(c, set()).update(gens)
            pre[c] -= gens

    for topic, partition, offset, op in ops:
        p.stats.records += 1
        p.offsets[(topic, partition)] = max(p.offsets.get((topic, partition), 0), offset + 1)
        if isinstance(op, str):
            p.stats.ignore(op)
        elif isinstance(op, Reject):
            p.rejects.append(op)
            p.stats.rejected += 1
        elif isinstance(op, DeleteConversation):
            drop_pre(op.conv, set(pre_of(op.conv)))
            pending.pop(op.conv, None)
            p.stats.deletes += 1
        elif isinstance(op, Upsert):
            r = op.row
            c = r.conv
            rows = pending.setdefault(c, {})
            if op.starts_generation:
                drop_pre(c, set(pre_of(c)))
                rows.clear()
            else:
                present = pre_of(c) | {g for g, _ in rows}
                if any(g > r.generation for g in present):
                    p.rejects.append(Reject(topic, partition, offset, "stale_generation",
                                            f"generation {r.generation} of {c[1]!r} arrived after a newer one",
                                            c[1].encode(), None))
                    p.stats.stale += 1
                    continue
                drop_pre(c, {g for g in pre_of(c) if g < r.generation})
                for k in [k for k in rows if k[0] < r.generation]:
                    del rows[k]
            rows[(r.generation, r.seq)] = r
            p.stats.upserts += 1
        elif isinstance(op, DeleteTexts):
            p.text_deletes.add(op.conv)
            pending_texts.pop(op.conv, None)
            p.stats.deletes += 1
        elif isinstance(op, Text):
            pending_texts.setdefault(op.conv, {})[op.seq] = op.text
            p.stats.texts += 1
    for c, rows in pending.items():
        for (g, s), r in rows.items():
            p.upserts[(c[0], c[1], g, s)] = r
    for c, texts in pending_texts.items():
        for s, t in texts.items():
            p.texts[(c[0], c[1], s)] = t
    return p


__all__ = ["BatchStats", "ConvKey", "DeleteConversation", "DeleteTexts", "Op", "Plan", "Reject", "RowKey", "Text",
           "TurnRow", "Upsert", "conversations_of", "parse_embedding_record", "parse_turn_record", "plan",
           "render_turn_text", "tenant_key"]
