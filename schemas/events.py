"""Wire events of evostream: what arrives on the turns topic, what leaves on the embeddings
topic, the query API bodies, and the dead-letter record.

Conventions, and why:

* JSON on the wire, one event per Kafka record, keyed by `conversation_id` so that all events
  of a conversation share a partition and therefore an order.
* Every event carries `schema_version: Literal[1] = 1`. A producer on a future version gets a
  clear `schema_violation` instead of being half-understood; absent means 1, so version-1
  producers may omit it.
* `extra="forbid"` everywhere: an unknown field is a defined error, not silently dropped data
  (a typo in `metdata` must not vanish without a trace).
* Every event that can be on a topic has a `type` tag; the inbound ones form a discriminated
  union (`InboundEvent`) so a single parse decides the shape.
* Inbound wire bytes are validated in *strict JSON* mode (`stream.processing.decode`): `"5"` is not a seq
  and `1.0` is not an int. Building models in Python stays lax for convenience.
* Timestamps are timezone-aware; a naive timestamp is ambiguous across producers, so it is an
  error rather than a guess.
* Sizes are bounded (ids, metadata, reasons) so that one record cannot make a worker, Redis key
  or log line arbitrarily large.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    computed_field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.messages import MAX_MESSAGES_PER_TURN, WireMessage
from schemas.turns import ChatMessage, TurnInput
from schemas.vectors import EncodedVector

from schemas.fields import (
    ConversationId,
    InboundTimestamp,
    MAX_QUERY_CHARS,
    MAX_SEQ,
    MAX_TOPIC_CHARS,
    Metadata,
    Millis,
    Name,
    ReasonText,
    SCHEMA_VERSION,
    Seq,
    Tenant,
    Timestamp,
)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- inbound


class _Inbound(BaseModel):
    """Inbound events are read tolerantly (issue #13): a field this version does not know is
    accepted and kept (`model_extra`, re-serialised with the event) instead of rejected, so a
    producer that adds a field does not dead-letter every turn until evostream is redeployed.
    `stream.processing.decode` counts such fields; `EVOSTREAM_INPUT_STRICT=true` restores the version-1
    contract (`TurnEventV1`: unknown fields are a `schema_violation`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        """Names of the fields this version does not know (`messages[i].x` for messages)."""
        return tuple(self.model_extra or ())


def _turn_rule_error(roles: list[str]) -> PydanticCustomError:
    return PydanticCustomError(
        "turn_roles",
        "a turn is the user message(s) and/or the assistant reply to them, in that order; "
        "got roles {roles}",
        {"roles": roles},
    )


class TurnEvent(_Inbound):
    """One conversation turn as published by a chat platform.

    `messages` holds the user message and/or the assistant reply to it, in that order, in any
    common chat format (`schemas.messages.WireMessage`): system/developer/tool/function
    messages, OpenAI-style `name`/`tool_calls`, and content parts are accepted; what the model
    reads of each is defined in `schemas.messages`. A turn in which no message has any
    content is rejected (`empty_turn`): it would spend a seq on nothing. A turn whose only
    content is in messages the model does not read (e.g. a lone system prompt) is valid but
    has no text (`has_text` False): it is acknowledged and counted, not embedded.
    `timestamp`: ISO 8601 with an offset, or an integer Unix epoch in seconds (below 10**11)
    or milliseconds (UTC).
    """

    type: Literal["turn"] = "turn"
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    seq: Seq
    messages: list[WireMessage] = Field(min_length=1, max_length=MAX_MESSAGES_PER_TURN)
    timestamp: InboundTimestamp
    tenant: Tenant | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _roles_and_content(self) -> "TurnEvent":
        # Raised with our own error types so the decoder can tell `empty_turn` apart from a
        # malformed turn without parsing message strings.
        said = [m.role for m in self.messages if m.read_by_model]
        if "assistant" in said and "user" in said[said.index("assistant"):]:
            raise _turn_rule_error([m.role for m in self.messages])
        if not any(m.text.strip() or m.tool_calls for m in self.messages):
            raise PydanticCustomError("empty_turn", "empty turn: every message of the turn is empty")
        return self

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        return super().unknown_fields + tuple(
            f"messages[{i}].{name}" for i, m in enumerate(self.messages) for name in m.unknown_fields)

    @property
    def unread_roles(self) -> tuple[str, ...]:
        """Roles of the messages the model does not read (system, developer, tool, function)."""
        return tuple(m.role for m in self.messages if not m.read_by_model)

    def _sides(self) -> list[ChatMessage]:
        sides = []
        for role in ("user", "assistant"):
            parts = [m for m in self.messages if m.role == role and m.content is not None]
            if parts:
                sides.append(ChatMessage(role=role, content="\n".join(m.text for m in parts)))
        return sides

    @property
    def has_text(self) -> bool:
        """Whether the model has anything to read in this turn (see the class docstring)."""
        return any(m.content.strip() for m in self._sides())

    def to_turn_input(self) -> TurnInput:
        """The engine's view of this turn: user side, assistant side (transport fields, unread
        roles and OpenAI extras dropped). Raises ValueError when `has_text` is False."""
        return TurnInput(conversation_id=self.conversation_id, seq=self.seq, messages=self._sides())


class TurnEventV1(_Wire):
    """The version-1 turn contract, exactly as it was before the tolerant reader: unknown
    fields forbidden, roles user/assistant only, content a string, ISO timestamps only.
    `stream.processing.decode` checks records against it in strict mode (`EVOSTREAM_INPUT_STRICT`)."""

    type: Literal["turn"] = "turn"
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    seq: Seq
    messages: list[ChatMessage] = Field(min_length=1, max_length=2)
    timestamp: Timestamp
    tenant: Tenant | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _roles_and_content(self) -> "TurnEventV1":
        roles = [m.role for m in self.messages]
        if roles not in (["user"], ["assistant"], ["user", "assistant"]):
            raise _turn_rule_error(roles)
        if not any(m.content.strip() for m in self.messages):
            raise PydanticCustomError("empty_turn", "empty turn: every message of the turn is empty")
        return self


class ConversationDelete(_Inbound):
    """Request to forget a conversation (memory, checkpoints, index entries).

    Travels on the turns topic with the same key as the conversation's turns, so it lands on
    the same partition and is ordered after every turn published before it: no turn can
    resurrect the memory after the delete has been processed. `seq`, when given, is the last
    turn seq the producer published before deleting (an audit hint; None when unknown).
    """

    type: Literal["delete"] = "delete"
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    seq: Seq | None = None
    timestamp: InboundTimestamp
    tenant: Tenant | None = None


class ConversationDeleteV1(_Wire):
    """The version-1 delete contract (strict mode)."""

    type: Literal["delete"] = "delete"
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    seq: Seq | None = None
    timestamp: Timestamp
    tenant: Tenant | None = None


InboundEvent = Annotated[TurnEvent | ConversationDelete, Field(discriminator="type")]
INBOUND_EVENT_ADAPTER: TypeAdapter[TurnEvent | ConversationDelete] = TypeAdapter(InboundEvent)
INBOUND_TYPES: frozenset[str] = frozenset({"turn", "delete"})
InboundEventV1 = Annotated[TurnEventV1 | ConversationDeleteV1, Field(discriminator="type")]
INBOUND_EVENT_V1_ADAPTER: TypeAdapter[TurnEventV1 | ConversationDeleteV1] = TypeAdapter(InboundEventV1)
"""Strict mode: the version-1 contract, unknown fields and roles rejected."""


# --------------------------------------------------------------------------- outbound


class SourceRef(_Wire):
    """Where the input record was read: lets a consumer trace an embedding back to its turn."""

    topic: Annotated[str, Field(min_length=1, max_length=MAX_TOPIC_CHARS)]
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class StageTimings(_Wire):
    """Milliseconds spent per stage of this turn's batch (for latency debugging downstream).

    `queue_ms`: from the turn record's timestamp to the event's creation; `step_ms`: the model
    step of the batch; `checkpoint_ms`: reading the batch's checkpoints from Redis (0 when all
    states were cached). The checkpoint *write* cannot be included: the event is written into
    the checkpoint's outbox by that very write, so its bytes are fixed before it."""

    queue_ms: Millis
    step_ms: Millis
    checkpoint_ms: Millis


class MemoryOrigin(StrEnum):
    """How the memory an embedding was computed against relates to the conversation.

    A conversation's memory can end (idle expiry, a delete, an operator reset); the next turn
    then starts from an empty memory. Consumers see it on the event instead of guessing from
    `memory_len`."""

    CONTINUED = "continued"
    """The memory holds every earlier applied turn of this conversation (up to the queue size)."""
    NEW = "new"
    """First turn ever seen for this (tenant, conversation id)."""
    RESET_AFTER_EXPIRY = "reset_after_expiry"
    """The conversation's state expired (idle longer than STATE_TTL_S); memory starts empty."""
    RESET_AFTER_DELETE = "reset_after_delete"
    """A turn after the conversation was deleted: a new generation with an empty memory."""
    RESET_BY_OPERATOR = "reset_by_operator"
    """An operator reset the conversation (`evostream reset`), e.g. after quarantine."""


DOCUMENT_ID_NAMESPACE = uuid.UUID("5f0c3a52-6c1e-4d7a-9a43-3b8e2f1d9e17")
"""UUID namespace of per-turn document ids (fixed for ever: ids are stored downstream)."""


def document_id(tenant: str | None, conversation_id: str, generation: int, seq: int) -> str:
    """The per-turn document id (issue #19): UUID v5 in DOCUMENT_ID_NAMESPACE of
    `tenant + U+001F + conversation_id + U+001F + generation + U+001F + seq` (the default tenant
    is ""). Why: a Kafka Connect sink that takes the record key (the conversation id) as the
    document id keeps one document per conversation; this id names one turn's embedding in one
    generation, is the same for every redelivered copy, fits any store's id column (36
    characters) and can be recomputed in any language. U+001F cannot occur in tenants or ids."""
    name = "\x1f".join((tenant or "", conversation_id, str(generation), str(seq)))
    return str(uuid.uuid5(DOCUMENT_ID_NAMESPACE, name))


def _plain_floats(value: object) -> object:
    """A vector sent as a plain JSON array of numbers (EVOSTREAM_OUTPUT_VECTOR_FORMAT=floats) is
    read as the float32 vector it prints: our own float32 values round-trip exactly."""
    if isinstance(value, list):
        import numpy as np

        if not value or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise PydanticCustomError("vector_floats", "a plain vector must be a non-empty array of numbers")
        from schemas.vectors import encode_vector

        try:
            return encode_vector(np.asarray(value, dtype=np.float64).astype(np.float32))
        except ValueError as exc:
            raise PydanticCustomError("vector_floats", "invalid plain vector: {error}", {"error": str(exc)}) from None
    return value


class EmbeddingEvent(_Wire):
    """The embedding of one conversation after one turn, keyed by conversation id.

    Delivery is at-least-once; consumers deduplicate on `idempotency_key` =
    (conversation_id, seq), or on `document_id` (one turn in one generation). A redelivered
    event for the same key carries the same vector (the checkpoint store commits the turn
    before the event is emitted). `vector` is read from the encoded form or from a plain
    array of numbers (what EVOSTREAM_OUTPUT_VECTOR_FORMAT=floats writes).
    """

    type: Literal["embedding"] = "embedding"
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    seq: Seq
    vector: Annotated[EncodedVector, BeforeValidator(_plain_floats)]
    dim: int = Field(ge=1)
    model: Name
    checkpoint: Name
    """Fingerprint of the model checkpoint that produced the vector: vectors from different
    checkpoints are not comparable."""
    memory_len: int = Field(ge=0)
    """Number of memory latents the embedding was computed against."""
    memory: MemoryOrigin = MemoryOrigin.CONTINUED
    """How that memory relates to the conversation (continued, or why it starts empty)."""
    generation: int = Field(1, ge=1)
    """Incremented each time the conversation's memory restarts after a delete/expiry/reset."""
    tenant: Tenant | None = None
    source: SourceRef
    timings: StageTimings
    produced_at: Timestamp

    @model_validator(mode="before")
    @classmethod
    def _document_id_is_derived(cls, data: object) -> object:
        """`document_id` is written by us (a computed field) and read back: it must be the id
        of the event's own (tenant, conversation, generation, seq), never a second truth."""
        if isinstance(data, dict) and "document_id" in data:
            data = dict(data)
            given = data.pop("document_id")
            try:
                want = document_id(data.get("tenant"), data["conversation_id"], int(data.get("generation", 1)),
                                   int(data["seq"]))
            except (KeyError, TypeError, ValueError):
                return data  # the fields themselves are invalid: their own errors say so
            if given != want:
                raise PydanticCustomError("document_id_mismatch",
                                          "document_id {given} is not the id of this turn ({want})",
                                          {"given": str(given)[:64], "want": want})
        return data

    @model_validator(mode="after")
    def _dim_matches_vector(self) -> "EmbeddingEvent":
        if self.dim != self.vector.dim:
            raise ValueError(f"dim {self.dim} does not match vector.dim {self.vector.dim}")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def document_id(self) -> str:
        """Per-turn document id (see `document_id()`): one turn's embedding in one generation."""
        return document_id(self.tenant, self.conversation_id, self.generation, self.seq)

    @property
    def idempotency_key(self) -> tuple[str, int]:
        return (self.conversation_id, self.seq)


class ConversationDeleted(_Wire):
    """Downstream tombstone: the conversation's memory is gone; consumers drop what they hold.

    `deleted_through_seq` is the last turn that had been applied when the memory was
    deleted (None if no turn had been): embeddings with a seq <= it are superseded by this.
    """

    type: Literal["conversation_deleted"] = "conversation_deleted"
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    deleted_through_seq: Seq | None
    at: Timestamp
    tenant: Tenant | None = None


OutboundEvent = Annotated[EmbeddingEvent | ConversationDeleted, Field(discriminator="type")]
OUTBOUND_EVENT_ADAPTER: TypeAdapter[EmbeddingEvent | ConversationDeleted] = TypeAdapter(
    OutboundEvent
)


# --------------------------------------------------------------------------- query API


class QueryRequest(_Wire):
    """Embed `query` against a conversation's current memory (and optionally search it)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]
    k: int = Field(default=5, ge=1, le=100)


class SearchHit(_Wire):
    seq: Seq
    score: Annotated[float, Field(allow_inf_nan=False)]
    text: str | None = None


class QueryResponse(_Wire):
    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationId
    vector: EncodedVector
    dim: int = Field(ge=1)
    memory_len: int = Field(ge=0)
    applied_seq: int = Field(ge=-1, le=MAX_SEQ)
    """Last turn contained in the memory the query was embedded against; -1 if none."""
    checkpoint: Name
    model: Name
    hits: list[SearchHit] | None = None
    """None when no index is configured (as opposed to [] = searched, nothing found)."""

    @model_validator(mode="after")
    def _dim_matches_vector(self) -> "QueryResponse":
        if self.dim != self.vector.dim:
            raise ValueError(f"dim {self.dim} does not match vector.dim {self.vector.dim}")
        return self


# --------------------------------------------------------------------------- dead letters


class DeadLetterReason(StrEnum):
    """Why a record was dead-lettered. Stable strings: dashboards and replay tools key on them."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    """Not a JSON object: null/empty value, syntax error, NaN/Infinity, duplicate names,
    unpaired surrogate escapes, or a non-object top level."""
    TOO_DEEP = "too_deep"
    TOO_LARGE = "too_large"
    SCHEMA_VIOLATION = "schema_violation"
    UNKNOWN_ROLE = "unknown_role"
    EMPTY_TURN = "empty_turn"
    KEY_MISMATCH = "key_mismatch"
    MISSING_KEY = "missing_key"
    SEQ_OUT_OF_RANGE = "seq_out_of_range"
    UNKNOWN_TYPE = "unknown_type"
    TURN_TOO_LONG = "turn_too_long"
    """Set by the pipeline (token limit), never by the decoder."""
    SEQ_GAP = "seq_gap"
    """Set by the pipeline, only when the gap policy says dead-letter."""
    PROCESSING_ERROR = "processing_error"
    CHECKPOINT_CORRUPT = "checkpoint_corrupt"
    """The conversation's checkpoint is incomplete or inconsistent (e.g. a key evicted): the
    conversation is quarantined until an operator resets it; other conversations flow."""
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    """The conversation was checkpointed under another model: its memory is never continued."""
    TENANT_MISMATCH = "tenant_mismatch"
    """The stored checkpoint belongs to another (tenant, conversation id)."""
    LATE_TURN = "late_turn"
    """Set by the pipeline: a seq the conversation had skipped (applied over a gap) arrived
    after later turns were applied; memory is never rewound to insert it (README "Late and
    corrected turns")."""
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    """Set by the pipeline: an applied seq was sent again with other messages (an edit, a
    producer bug); the applied version stays in memory, this one is kept here."""


def _valid_b64(value: str | None) -> str | None:
    if value is not None:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not valid base64: {exc}") from None
    return value


B64Bytes = Annotated[str | None, AfterValidator(_valid_b64)]

DEAD_LETTER_OVERHEAD_BYTES = 16 * 1024
"""Upper bound on a dead letter's JSON besides the two base64 fields (reason <= 2 KiB even
when every char is JSON-escaped, topic, worker, numbers, field names)."""


def dead_letter_size_bound(max_record_bytes: int) -> int:
    """Largest serialised DeadLetterEvent for an input record of at most `max_record_bytes`
    (key + value). Configure the dead-letter producer (`max.request.size`) and topic
    (`max.message.bytes`) to at least this, with `max_record_bytes` = the turns topic's
    `max.message.bytes`, or an oversized record cannot be dead-lettered."""
    return 4 * ((max_record_bytes + 2) // 3) + 8 + DEAD_LETTER_OVERHEAD_BYTES


class DeadLetterEvent(_Wire):
    """A record the service could not process, with its exact original bytes.

    The key and value are carried verbatim (base64) rather than summarised so a record can be
    inspected and replayed after a fix, and so that nothing is lost. The decoder caps nothing
    here: a `too_large` record is dead-lettered whole, so the dead-letter producer and topic
    must accept `dead_letter_size_bound(turns topic max.message.bytes)` bytes.
    `original_*_b64` is None when the Kafka key/value was null, "" when it was empty.
    """

    type: Literal["dead_letter"] = "dead_letter"
    schema_version: Literal[1] = SCHEMA_VERSION
    reason_code: DeadLetterReason
    reason: ReasonText
    original_key_b64: B64Bytes
    original_value_b64: B64Bytes
    topic: Annotated[str, Field(min_length=1, max_length=MAX_TOPIC_CHARS)]
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    timestamp_ms: int | None
    """Kafka record timestamp; None when the record had none."""
    failed_at: Timestamp
    worker: Name
    # --- bounded dead letters (issue #8) ---
    truncated: bool = False
    """True when `original_*_b64` hold only a PREFIX of the original bytes, because the whole
    record would not fit the broker's size limit; the `*_len` / `*_sha256` fields then describe
    the full originals (to match a dead letter with the record kept elsewhere)."""
    original_key_len: int | None = Field(None, ge=0)
    original_key_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    original_value_len: int | None = Field(None, ge=0)
    original_value_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    def original_key(self) -> bytes | None:
        return None if self.original_key_b64 is None else base64.b64decode(self.original_key_b64)

    def original_value(self) -> bytes | None:
        if self.original_value_b64 is None:
            return None
        return base64.b64decode(self.original_value_b64)


__all__ = [
    "B64Bytes",
    "ConversationDelete",
    "ConversationDeleted",
    "ConversationId",
    "DEAD_LETTER_OVERHEAD_BYTES",
    "DeadLetterEvent",
    "DeadLetterReason",
    "DOCUMENT_ID_NAMESPACE",
    "EmbeddingEvent",
    "document_id",
    "INBOUND_EVENT_ADAPTER",
    "INBOUND_TYPES",
    "InboundEvent",
    "MAX_SEQ",
    "MemoryOrigin",
    "OUTBOUND_EVENT_ADAPTER",
    "OutboundEvent",
    "QueryRequest",
    "QueryResponse",
    "ReasonText",
    "SCHEMA_VERSION",
    "SearchHit",
    "Seq",
    "SourceRef",
    "StageTimings",
    "TurnEvent",
    "TurnEventV1",
    "ConversationDeleteV1",
    "INBOUND_EVENT_V1_ADAPTER",
    "InboundTimestamp",
    "dead_letter_size_bound",
]
