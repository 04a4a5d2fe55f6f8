"""The values that cross the memory-state store's boundary: what is read from Redis (parsed and
type-checked, since another version may have written it), what a batch commits, and what a
commit or a load answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import DeadLetterReason, MemoryOrigin
from stream.identity import ConversationRef, as_ref
from stream.state.errors import MemoryCorrupt
from workers.state import NO_SEQ, ConversationState, StateDelta


class SourceOffset(BaseModel):
    """Kafka position of the last turn reflected in a memory state (where a new owner resumes)."""

    model_config = ConfigDict(frozen=True)

    topic: str = Field(min_length=1)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class MemoryMeta(BaseModel):
    """The meta hash, parsed and type-checked (it may have been written by another version)."""

    model_config = ConfigDict(frozen=True)

    seq: int = Field(ge=NO_SEQ)
    gen: int = Field(1, ge=1)
    base_seq: int = Field(NO_SEQ, ge=NO_SEQ)
    n_deltas: int = Field(ge=0)
    fingerprint: str
    writer: str = ""
    updated_at_ms: int = 0
    tenant: str | None = None
    conversation_id: str | None = None  # None: written before identities were recorded
    source: SourceOffset | None = None
    gen_start: tuple[int, int] | None = None  # (partition, offset) of this generation's first record

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "MemoryMeta":
        h = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            source = (
                SourceOffset(topic=h["src_topic"], partition=int(h["src_partition"]),
                             offset=int(h["src_offset"]))
                if h.get("src_topic") else None
            )
            return cls(seq=int(h["seq"]), gen=int(h.get("gen", 1)), base_seq=int(h.get("base_seq", NO_SEQ)),
                       n_deltas=int(h.get("n_deltas", 0)),
                       fingerprint=h.get("fp", ""), writer=h.get("writer", ""),
                       updated_at_ms=int(h.get("updated_at_ms", 0)), tenant=h.get("tenant") or None,
                       conversation_id=h.get("cid"), source=source,
                       gen_start=(int(h["gsp"]), int(h["gso"])) if h.get("gsp") else None)
        except (KeyError, ValueError) as exc:
            raise MemoryCorrupt(f"unreadable memory-state meta {h!r}: {exc}") from exc


class MarkerInfo(BaseModel):
    """The long-lived marker beside a conversation's state (stream/state/keys.py)."""

    gen: int
    seq: int
    status: str
    at_ms: int = 0
    gap_rejects: int = 0
    deleted_at: tuple[int, int] | None = None  # (partition, offset) of the delete record
    held_seq: int | None = None  # a quarantined turn: later ones wait behind it (issue #17)
    held_reason: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "MarkerInfo | None":
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return cls(gen=int(h.get("gen", 0)), seq=int(h.get("seq", NO_SEQ)), status=h.get("status", "live"),
                       at_ms=int(h.get("at_ms", 0)), gap_rejects=int(h.get("gap_rejects", 0)),
                       deleted_at=(int(h["del_p"]), int(h["del_o"])) if h.get("del_p") else None,
                       held_seq=int(h["held_seq"]) if h.get("held_seq") else None,
                       held_reason=h.get("held_reason") or None)
        except ValueError:
            return None


class MemoryInfo(BaseModel):
    """What `evostream inspect` prints about one conversation (JSON-able)."""

    conversation_id: str
    tenant: str | None
    keys: dict[str, str]
    whole: bool = Field(description="False: the memory state is incomplete or corrupt (quarantined)")
    problem: str | None = None
    seq: int | None
    gen: int | None
    base_seq: int | None
    n_deltas: int
    fingerprint: str | None
    fingerprint_matches: bool | None
    writer: str | None
    updated_at_ms: int | None
    source: SourceOffset | None
    base_bytes: int
    delta_bytes: int
    delta_sizes: list[int]
    outbox_seqs: list[int]
    ttl_s: float | None = Field(description="seconds until the meta key expires; None = never")
    marker: MarkerInfo | None = None


@dataclass
class TurnCommit:
    """One conversation's part of a batch: the state after its turns and how it got there."""

    ref: ConversationRef
    expected_seq: int  # seq of the view the writer started from (NO_SEQ for a new conversation)
    state: ConversationState  # after the turns
    deltas: list[StateDelta]  # in order; deltas[-1].seq == state.seq
    outbox: dict[int, bytes] = field(default_factory=dict)  # seq -> encoded embedding event
    source: SourceOffset | None = None
    expected_gen: int = 1  # generation of the view the writer started from
    fresh: bool = False  # the view had no live state (new, or after a delete/expiry/reset)
    gen_start: tuple[int, int] | None = None  # fresh: (partition, offset) of the generation's first record
    ledger: dict[int, bytes] = field(default_factory=dict)  # seq -> 8-byte digest of the messages read

    @property
    def conversation_id(self) -> str:
        return self.ref.conversation_id

    def __post_init__(self) -> None:
        self.ref = as_ref(self.ref)
        if not self.deltas:
            raise ValueError(f"{self.ref}: a commit needs at least one delta")
        seqs = [d.seq for d in self.deltas]
        if any(b <= a for a, b in zip(seqs, seqs[1:])):
            raise ValueError(f"{self.ref}: delta seqs not increasing: {seqs}")
        if seqs[-1] != self.state.seq:
            raise ValueError(f"{self.ref}: last delta seq {seqs[-1]} != state seq {self.state.seq}")
        # (a fresh generation after a delete may restart its seqs below the deleted ones)
        if self.expected_seq < NO_SEQ or (seqs[0] <= self.expected_seq and not self.fresh):
            raise ValueError(f"{self.ref}: deltas start at {seqs[0]} but expected_seq is {self.expected_seq}")


class CommitStatus(str, Enum):
    APPLIED = "applied"
    ALREADY_APPLIED = "already_applied"  # this exact commit was stored before (a retry)
    STALE = "stale"  # the view changed (another writer advanced it, a delete, an expiry)
    FINGERPRINT = "fingerprint"  # stored under another model fingerprint
    CORRUPT = "corrupt"  # part of the memory state is missing: quarantined, nothing written


@dataclass(frozen=True)
class CommitResult:
    ref: ConversationRef
    applied: bool  # the store now holds this commit (APPLIED or ALREADY_APPLIED)
    stored_seq: int  # seq stored after the call
    compacted: bool  # this commit wrote a new base
    bytes_written: int  # payload bytes sent for this conversation (keys + script arguments)
    status: CommitStatus = CommitStatus.APPLIED
    n_deltas: int = 0  # deltas stored since the base after the call
    gen: int = 1

    @property
    def conversation_id(self) -> str:
        return self.ref.conversation_id


@dataclass
class LoadedMemory:
    """Where a writer starts from: the live state, or an empty one with the reason it is
    empty (`origin`), and the (gen, seq) its commit must name."""

    ref: ConversationRef
    state: ConversationState
    seq: int
    gen: int
    origin: MemoryOrigin  # CONTINUED for a live state
    outbox: dict[int, bytes]  # events committed but not yet acked, by seq
    source: SourceOffset | None
    n_deltas: int
    updated_at_ms: int = 0
    gap_rejects: int = 0
    gen_start: tuple[int, int] | None = None  # live: where this generation began in the partition
    deleted_at: tuple[int, int] | None = None  # after a delete: where the delete record was
    held: tuple[int, str] | None = None  # (seq, reason): a quarantined turn later ones wait behind

    @property
    def conversation_id(self) -> str:
        return self.ref.conversation_id

    @property
    def live(self) -> bool:
        return self.origin is MemoryOrigin.CONTINUED


@dataclass(frozen=True)
class MemoryProblem:
    """A conversation that cannot be continued: its turns are dead-lettered with `code`."""

    ref: ConversationRef
    code: DeadLetterReason
    detail: str


ORIGIN_BY_KIND = {
    "new": MemoryOrigin.NEW,
    "expired": MemoryOrigin.RESET_AFTER_EXPIRY,  # the marker outlived its state
    "deleted": MemoryOrigin.RESET_AFTER_DELETE,
    "reset": MemoryOrigin.RESET_BY_OPERATOR,
}
