"""What flows through one batch: the records as consumed, a turn that is due, the report."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.events import ConversationDelete, TurnEvent
from stream.identity import ConversationRef


@dataclass(frozen=True)
class InboundRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass
class Due:
    """A decoded turn waiting for its conversation's view (and then the model step)."""

    record: InboundRecord
    event: TurnEvent
    ref: ConversationRef


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


def conversation_ref(ev: TurnEvent | ConversationDelete) -> ConversationRef:
    return ConversationRef(ev.tenant, ev.conversation_id)
