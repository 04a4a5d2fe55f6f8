"""Dead letters that always fit the broker, and what to do with a record the broker refuses.

Why: a dead letter carries its original record in base64 (4/3 of the size) plus metadata. With
the default 1,000,000-byte input limit that is ~1.35 MB, above Kafka's default
`message.max.bytes` (1,048,588): the produce is refused, the emitter retried it forever and the
partition stalled. Now:

* `fit_dead_letter` keeps a dead letter whole when its Kafka record fits `limit` and otherwise
  keeps a prefix of the original key/value plus their full lengths and SHA-256 (`truncated`),
  cut so that the record batch (aiokafka's own upper-bound size estimate, the figure the broker
  compares with `message.max.bytes`) is within the limit.
* `OversizeHandler` is the emitter's answer to `MessageSizeTooLargeError` (refused by the
  client's `max_request_size` check or by the broker): a dead letter is cut smaller; an
  embedding event that is refused becomes a dead letter (reason `processing_error`) pointing at
  its input record. Nothing is retried forever, nothing blocks the partition.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import datetime, timezone
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.events import OUTBOUND_EVENT_ADAPTER, DeadLetterEvent, DeadLetterReason, EmbeddingEvent, ReasonText
from stream.kafka.emitter import OutMessage
from stream.processing.records import BatchReport, Due, InboundRecord
from stream.runtime.logs import fields as log_fields
from stream.state.records import MemoryProblem

log = logging.getLogger(__name__)

__all__ = ["DeadLetterWriter", "OversizeHandler", "Rejection", "dead_letter_budget", "fit_dead_letter", "make_dead_letter", "record_size"]

#: Room kept for what the size estimate may not see (record headers a client adds, protocol
#: framing differences between broker versions).
SAFETY_BYTES = 512


def record_size(key: bytes | None, value: bytes | None) -> int:
    """Upper bound of the size of a one-record Kafka batch holding (key, value), uncompressed."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])


def dead_letter_budget(limit: int) -> int:
    """The record size dead letters are cut to for a broker limit of `limit` bytes."""
    return max(4096, limit - SAFETY_BYTES)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(bytes(raw)).decode("ascii")


def fit_dead_letter(event: DeadLetterEvent, key: bytes | None, limit: int) -> DeadLetterEvent:
    """`event` unchanged if its record (with record key `key`) fits `limit` bytes; otherwise a
    copy whose originals are prefixes, with the full lengths and SHA-256 of the originals.

    Already-truncated events (cut again after a refusal) keep the lengths/digests of the first
    cut, which describe the real originals."""
    if record_size(key, event.model_dump_json().encode()) <= limit:
        return event
    okey, oval = event.original_key(), event.original_value()
    if event.truncated:
        meta = dict(original_key_len=event.original_key_len, original_key_sha256=event.original_key_sha256,
                    original_value_len=event.original_value_len, original_value_sha256=event.original_value_sha256)
    else:
        meta = dict(
            original_key_len=None if okey is None else len(okey),
            original_key_sha256=None if okey is None else hashlib.sha256(okey).hexdigest(),
            original_value_len=None if oval is None else len(oval),
            original_value_sha256=None if oval is None else hashlib.sha256(oval).hexdigest(),
        )

    def build(nk: int, nv: int) -> DeadLetterEvent:
        return event.model_copy(update=dict(
            truncated=True, **meta,
            original_key_b64=_b64(None if okey is None else okey[:nk]),
            original_value_b64=_b64(None if oval is None else oval[:nv])))

    empty = build(0, 0)
    room = limit - record_size(key, empty.model_dump_json().encode())
    if room < 0:
        log.error("a dead letter does not fit %d bytes even without its original record; sending it "
                  "without the original bytes", limit)
        return empty
    raw_room = room // 4 * 3  # base64: 4 chars per 3 bytes
    # the key first: it is usually small and it is what identifies the conversation
    nk = min(len(okey or b""), raw_room)
    nv = min(len(oval or b""), raw_room - nk)
    out = build(nk, nv)
    # the estimate is exact for this shape, but shrink defensively rather than trust arithmetic
    while record_size(key, out.model_dump_json().encode()) > limit and (nk or nv):
        if nv:
            nv = max(0, nv - max(3, nv // 50))
        else:
            nk = max(0, nk - max(3, nk // 50))  # only when the key alone is too large
        out = build(nk, nv)
    return out


class Rejection(BaseModel):
    """Why a record cannot be processed; becomes a DeadLetterEvent via `make_dead_letter`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason_code: DeadLetterReason
    reason: ReasonText


def make_dead_letter(
    rejection: Rejection,
    key: bytes | None,
    value: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    worker: str,
    *,
    failed_at: datetime | None = None,
    broker_limit: int | None = None,
) -> DeadLetterEvent:
    """Wrap a rejection with the record's exact bytes and coordinates.

    The original bytes are kept whole, except when `broker_limit` (the broker's record size
    limit) is given and the dead letter (keyed by `key`) would exceed it: then a prefix, the
    full length and the SHA-256 are kept (`fit_dead_letter`, issue #8), because a dead
    letter the broker refuses would stall the partition.
    Kafka's "no timestamp" (-1) is normalised to None.
    """
    event = DeadLetterEvent(
        reason_code=rejection.reason_code,
        reason=rejection.reason,
        original_key_b64=_b64(key),
        original_value_b64=_b64(value),
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=None if timestamp_ms is None or timestamp_ms < 0 else timestamp_ms,
        failed_at=failed_at or datetime.now(timezone.utc),
        worker=worker,
    )
    if broker_limit is not None:
        event = fit_dead_letter(event, key or None, dead_letter_budget(broker_limit))
    return event


class OversizeHandler:
    """The emitter's `on_too_large` hook: what to send instead of a refused record.

    Each refusal of a dead letter cuts it to a quarter of the size it had (a broker whose real
    limit is below the configured one still takes it after a few rounds); at zero original bytes
    it is given up with an ERROR line (the refusal is then not a size problem we can solve)."""

    def __init__(self, *, dead_letter_topic: str, embeddings_topic: str, limit: int, worker: str) -> None:
        self.dead_letter_topic = dead_letter_topic
        self.embeddings_topic = embeddings_topic
        self.limit = dead_letter_budget(limit)
        self.worker = worker
        self.replaced = 0
        self.dropped = 0

    def __call__(self, m: OutMessage, exc: BaseException) -> OutMessage | None:
        size = record_size(m.key, m.value)
        if m.topic == self.dead_letter_topic:
            try:
                dl = DeadLetterEvent.model_validate_json(m.value)
            except ValidationError:
                return self._drop(m, exc, "not a dead letter")
            if dl.truncated and not (dl.original_key_b64 or dl.original_value_b64):
                return self._drop(m, exc, "already without its original bytes")
            smaller = fit_dead_letter(dl, m.key, min(self.limit, max(1024, size // 4)))
            if smaller == dl:  # nothing left to cut at this bound: strip the originals
                smaller = fit_dead_letter(dl, m.key, 1)
            self.replaced += 1
            log.warning("the broker refused a %d-byte dead letter (%s); resending it cut to %d bytes",
                        size, exc, record_size(m.key, smaller.model_dump_json().encode()))
            return OutMessage(m.topic, m.key, smaller.model_dump_json().encode())
        if m.topic == self.embeddings_topic:
            try:
                ev = OUTBOUND_EVENT_ADAPTER.validate_json(m.value)
            except ValidationError:
                return self._drop(m, exc, "unparseable output")
            if not isinstance(ev, EmbeddingEvent):
                return self._drop(m, exc, type(ev).__name__)
            src = ev.source
            dl = make_dead_letter(
                Rejection(reason_code=DeadLetterReason.PROCESSING_ERROR,
                          reason=f"the embedding event of seq {ev.seq} ({size} bytes) was refused by the broker as "
                                 f"too large ({type(exc).__name__}); the original here is that event"),
                m.key, m.value, src.topic, src.partition, src.offset, None, self.worker)
            self.replaced += 1
            log.error("the broker refused a %d-byte embedding event of %r seq %d as too large; dead-lettered it",
                      size, ev.conversation_id, ev.seq)
            return OutMessage(self.dead_letter_topic, m.key, fit_dead_letter(dl, m.key, self.limit)
                              .model_dump_json().encode())
        return self._drop(m, exc, f"topic {m.topic}")

    def _drop(self, m: OutMessage, exc: BaseException, why: str) -> None:
        self.dropped += 1
        log.error("dropping a %d-byte record for %s refused as too large (%s; %s): it cannot be made smaller",
                  len(m.value), m.topic, exc, why)
        return None


class DeadLetterWriter:
    """The pipeline's one way to refuse a record: the dead letter (original bytes kept, cut to
    the broker's limit), its metric and one log line with the record's coordinates."""

    def __init__(self, *, topic: str, worker: str, broker_limit: int, metrics: Any) -> None:
        self.topic = topic
        self.worker = worker
        self.broker_limit = broker_limit
        self.metrics = metrics

    def __call__(self, rec: InboundRecord, rej: Rejection, rep: BatchReport) -> OutMessage:
        code = rej.reason_code.value
        rep.dead_letters[code] = rep.dead_letters.get(code, 0) + 1
        self.metrics.dead_letters.labels(reason=code).inc()
        log.warning("dead-letter %s/%d@%d: %s: %s", rec.topic, rec.partition, rec.offset, code, rej.reason[:200],
                    extra=log_fields(topic=rec.topic, partition=rec.partition, offset=rec.offset, reason_code=code,
                                     conversation_id=rec.key.decode("utf-8", "replace") if rec.key else None))
        dl = make_dead_letter(rej, rec.key, rec.value, rec.topic, rec.partition, rec.offset, rec.timestamp_ms,
                              self.worker, broker_limit=self.broker_limit)
        return OutMessage(self.topic, rec.key if rec.key else None, dl.model_dump_json().encode())

    def quarantined(self, d: Due, problem: MemoryProblem, rep: BatchReport) -> OutMessage:
        """A turn of a conversation that cannot be continued: dead-lettered with the reason,
        counted; the rest of the batch (and the partition) flows on."""
        self.metrics.quarantined.labels(reason=problem.code.value).inc()
        hint = (" (see `evostream inspect`; `evostream reset` starts it over, then replay its dead letters)"
                if problem.code is DeadLetterReason.CHECKPOINT_CORRUPT else "")
        return self(d.record, Rejection(reason_code=problem.code, reason=f"conversation {d.ref}: {problem.detail}{hint}"),
                    rep)
