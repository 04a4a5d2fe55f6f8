"""Redis checkpoint store: the durable memory of every conversation.

Why Redis and not a changelog topic: a worker that takes over a partition must serve its next
turn at once. Replaying a changelog to rebuild millions of conversations takes hours (Quix
Streams #1131, KIP-892); reading one conversation's keys takes a millisecond. So the design
follows Quix Streams' state layer (Store -> Partition -> Transaction: one transaction gathers a
batch's updates and commits them together) with Redis as the store:

* one `commit()` call is the batch's transaction: ONE pipelined round trip, carrying one
  atomic Lua script call per conversation;
* each script call is compare-and-set on the conversation's `seq`. That is the fencing: a
  worker that lost its partitions (a zombie) cannot overwrite what its successor advanced, and
  a replayed turn changes nothing;
* a turn normally appends its small `StateDelta`; every `compact_every` deltas the full state is
  written as the new base and the delta list cleared, in the same script, so a turn never
  rewrites the whole (up to MiB-sized) memory and a load never replays more than
  `compact_every` deltas;
* the embedding events of the committed turns go into an *outbox* in the same script, so an
  embedding computed once is re-emitted bit-identically if the worker dies between
  checkpoint and emit; `ack_emitted` removes them once the broker confirmed delivery.

Whole or quarantined. A conversation's keys can disappear one at a time (a `volatile-*`
eviction policy evicts any key with a TTL). So the checkpoint checks itself: the meta hash
records `base_seq` (the seq the base stands at), every stored delta records the seq it
continues (`StateDelta.prev_seq`), and a load that finds a missing base, a broken delta chain,
or state keys without their meta reports the conversation as *corrupt* instead of rebuilding
a shorter memory. The pipeline quarantines it (its turns are dead-lettered
`checkpoint_corrupt`) while every other conversation flows; `evostream reset` ends it.

Deletes are tombstones, not plain DELs. Each conversation has a small, long-lived *marker*
(generation, last seq, status) beside its state. A delete (or an operator reset) drops the
state keys and sets the marker's status; every writer's commit names the generation and seq
it started from, and the script compares them with the "view" computed from meta + marker.
A writer that computed a turn before the delete (a paused zombie) therefore can never bring
the conversation back. The marker outlives the state by `marker_ttl_s`, so a conversation
whose state expired is told apart from one with a seq gap, and its next embedding says
`memory: reset_after_expiry`.

Key layout: all keys of one conversation share the Redis-Cluster hash tag `{<tag>}`, where
`tag` is a fixed-length hash of (tenant, conversation id) (`stream.identity`), so the scripts'
keys live in one slot whatever characters an id contains, and two tenants' conversations
with one id never share state:

    <ns>:{<tag>}:meta    hash   seq, gen, base_seq, n_deltas, fp (model fingerprint), writer,
                                digest, updated_at_ms, tenant, cid, src_topic, src_partition,
                                src_offset
    <ns>:{<tag>}:base    string ConversationState.to_bytes() at the last compaction (absent
                                until the first compaction)
    <ns>:{<tag>}:deltas  list   StateDelta.to_bytes(), one per turn since the base
    <ns>:{<tag>}:outbox  hash   seq -> encoded embedding event (until acked)
    <ns>:{<tag>}:mark    hash   gen, seq, status (live | deleted | reset | cold), tenant, cid, at_ms,
                                gap_rejects; TTL = state TTL + marker_ttl_s

The four state keys' TTL is refreshed on each commit, so idle conversations expire together.
Requires Redis >= 7.2 or Valkey (scripts use TIME followed by writes, multi-field HSET;
the optional durability wait uses WAITAOF).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import torch
from pydantic import BaseModel, ConfigDict, Field
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript

from schemas.events import DeadLetterReason, MemoryOrigin
from stream.identity import ConversationRef, RefLike, as_ref
from stream.settings import Durability
from stream.backoff import Backoff
from stream.state.availability import StoreUnavailable, is_unavailable, unavailable_as, wait_until
from stream.state.redis_client import RedisOptions, describe_url, make_redis
from workers.state import _CODE_DTYPES, NO_SEQ, ConversationState, StateDelta, StateFormatError, rebuild

__all__ = [
    "CheckpointCorrupt", "CheckpointError", "CheckpointProblem", "CheckpointStore", "CommitResult",
    "CommitStatus", "ConversationKeys", "ConversationRef", "Durability", "FingerprintMismatch",
    "LoadedCheckpoint", "SourceOffset", "StaleDelete", "StoreUnavailable", "TurnCommit", "UnsafeRedisConfig",
    "conversation_keys",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Lua. Status codes returned by the commit script (first element of its reply).
_APPLIED, _STALE, _FINGERPRINT, _ALREADY_APPLIED, _CORRUPT = 1, 0, 2, 3, 4

# Where a writer starts from ("the view"), computed the same way by the load script, the
# commit script and the delete script, so that a writer's expectation can be compared:
#   meta present                -> live:     (meta.gen, meta.seq)
#   no meta, marker present     -> expired / deleted / reset: (marker.gen + 1, marker.seq)
#   neither                     -> new:      (1, -1)
#   no meta but base or deltas  -> corrupt (part of a checkpoint was evicted)
_VIEW_LUA = """
local function view(meta, base, deltas, mark)
  local cur = redis.call('HMGET', meta, 'seq', 'gen')
  if cur[1] then
    return 'live', tonumber(cur[2] or '1'), tonumber(cur[1])
  end
  if redis.call('EXISTS', base) == 1 or redis.call('EXISTS', deltas) == 1 then
    return 'corrupt', 0, -1
  end
  local m = redis.call('HMGET', mark, 'gen', 'seq', 'status')
  if m[1] then
    local status = m[3] or 'live'
    if status == 'live' then status = 'expired' end  -- the marker outlived its state
    return status, tonumber(m[1]) + 1, tonumber(m[2])
  end
  return 'new', 1, -1
end
"""

# KEYS: meta, base, deltas, outbox, mark.
# ARGV: expected_gen, expected_seq, new_seq, fp, writer, digest, mode ("d" append | "c" compact),
#       ttl_ms (0 = persist), src_topic ("" = none), src_partition, src_offset,
#       n_payload, n_outbox, mark_ttl_ms (0 = persist), tenant ("" = default), cid,
#       gen_start_partition ("" = unknown), gen_start_offset, payload..., outbox (seq, event)...
# Reply: {status, stored_seq, n_deltas, compacted, gen}
_COMMIT_LUA = _VIEW_LUA + """
local meta, base, deltas, outbox, mark = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local exp_gen, expected, new_seq = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local fp, writer, digest, mode = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local ttl_ms = tonumber(ARGV[8])
local n_payload, n_outbox = tonumber(ARGV[12]), tonumber(ARGV[13])
local mark_ttl_ms = tonumber(ARGV[14])

local kind, gen, stored = view(meta, base, deltas, mark)
if kind == 'corrupt' then
  return {4, stored, 0, 0, gen}
end
if kind == 'live' then
  local cur = redis.call('HMGET', meta, 'fp', 'digest')
  if cur[1] ~= fp then
    return {2, stored, redis.call('LLEN', deltas), 0, gen}
  end
  if gen ~= exp_gen or stored ~= expected then
    if tostring(stored) == new_seq and cur[2] == digest then
      -- our own commit, retried after its reply was lost: report success, change nothing
      return {3, stored, redis.call('LLEN', deltas), 0, gen}
    end
    return {0, stored, redis.call('LLEN', deltas), 0, gen}
  end
elseif gen ~= exp_gen or stored ~= expected then
  -- deleted / expired / reset since the writer looked: nobody brings the old memory back
  return {0, stored, 0, 0, gen}
end

if kind ~= 'live' then
  redis.call('DEL', outbox)  -- a previous generation's undelivered events never leak into this one
end
local i = 19
local compacted = 0
local base_seq = redis.call('HGET', meta, 'base_seq') or '-1'
if kind == 'live' and mode ~= 'c' then
  -- appending to a chain that lost a piece (a key evicted since the writer read it) would
  -- store a checkpoint that can never load; a compaction (the writer's full state at this
  -- very (gen, seq)) replaces the chain instead, which repairs it
  local n_meta = tonumber(redis.call('HGET', meta, 'n_deltas') or '0')
  if n_meta ~= redis.call('LLEN', deltas) or (tonumber(base_seq) >= 0 and redis.call('EXISTS', base) == 0) then
    return {4, stored, 0, 0, gen}
  end
end
if mode == 'c' then
  redis.call('SET', base, ARGV[i])
  redis.call('DEL', deltas)
  compacted = 1
  base_seq = new_seq
  i = i + 1
else
  for j = i, i + n_payload - 1 do
    redis.call('RPUSH', deltas, ARGV[j])
  end
  i = i + n_payload
end
for j = i, i + 2 * n_outbox - 1, 2 do
  redis.call('HSET', outbox, ARGV[j], ARGV[j + 1])
end

local n = redis.call('LLEN', deltas)
local t = redis.call('TIME')
local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', meta, 'seq', new_seq, 'gen', gen, 'base_seq', base_seq, 'n_deltas', n, 'fp', fp,
           'writer', writer, 'digest', digest, 'updated_at_ms', now_ms, 'tenant', ARGV[15], 'cid', ARGV[16])
if kind ~= 'live' and ARGV[17] ~= '' then
  -- where this generation began in the partition: older records belong to an earlier one
  redis.call('HSET', meta, 'gsp', ARGV[17], 'gso', ARGV[18])
end
if ARGV[9] ~= '' then
  redis.call('HSET', meta, 'src_topic', ARGV[9], 'src_partition', ARGV[10], 'src_offset', ARGV[11])
else
  redis.call('HDEL', meta, 'src_topic', 'src_partition', 'src_offset')
end
for k = 1, 4 do
  if ttl_ms > 0 then redis.call('PEXPIRE', KEYS[k], ttl_ms) else redis.call('PERSIST', KEYS[k]) end
end
redis.call('HSET', mark, 'gen', gen, 'seq', new_seq, 'status', 'live', 'tenant', ARGV[15], 'cid', ARGV[16],
           'at_ms', now_ms, 'gap_rejects', 0)
if mark_ttl_ms > 0 then redis.call('PEXPIRE', mark, mark_ttl_ms) else redis.call('PERSIST', mark) end
return {1, tonumber(new_seq), n, compacted, gen}
"""

# One consistent read of a conversation (a commit cannot interleave between the reads).
# Reply: {kind, gen, seq, meta_flat, base, deltas, outbox_flat, mark_flat}
_LOAD_LUA = _VIEW_LUA + """
local kind, gen, seq = view(KEYS[1], KEYS[2], KEYS[3], KEYS[5])
local m = redis.call('HGETALL', KEYS[5])
if kind == 'live' or kind == 'corrupt' then
  return {kind, gen, seq, redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or '',
          redis.call('LRANGE', KEYS[3], 0, -1), redis.call('HGETALL', KEYS[4]), m}
end
return {kind, gen, seq, {}, '', {}, {}, m}
"""

# End a conversation's memory (delete, or an operator's reset): drop its state keys and leave
# a marker (gen, last seq, status) that refuses every commit computed before it.
# KEYS: meta, base, deltas, outbox, mark. ARGV: status, mark_ttl_ms (0 = persist), tenant, cid,
# partition ("" = unknown) and offset of the delete record.
# Reply: {existed (0|1, or -1: a replayed delete older than the live generation, ignored), last_seq, gen}
_END_LUA = _VIEW_LUA + """
local kind, gen, seq = view(KEYS[1], KEYS[2], KEYS[3], KEYS[5])
if kind == 'live' and ARGV[5] ~= '' then
  local g = redis.call('HMGET', KEYS[1], 'gsp', 'gso')
  if g[1] == ARGV[5] and tonumber(g[2]) > tonumber(ARGV[6]) then
    return {-1, seq, gen}
  end
end
local existed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local mark_gen = gen
if kind ~= 'live' and kind ~= 'corrupt' then mark_gen = gen - 1 end
if kind == 'corrupt' then
  local m = redis.call('HMGET', KEYS[5], 'gen', 'seq')
  mark_gen = tonumber(m[1] or '0')
  seq = tonumber(m[2] or '-1')
end
local t = redis.call('TIME')
local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[5], 'gen', mark_gen, 'seq', seq, 'status', ARGV[1], 'tenant', ARGV[3],
           'cid', ARGV[4], 'at_ms', now_ms, 'gap_rejects', 0)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[5], 'del_p', ARGV[5], 'del_o', ARGV[6])
else
  redis.call('HDEL', KEYS[5], 'del_p', 'del_o')
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[5], ttl) else redis.call('PERSIST', KEYS[5]) end
if existed > 0 then existed = 1 end
return {existed, seq, mark_gen}
"""


# --------------------------------------------------------------------------------------------
# Errors


class CheckpointError(RuntimeError):
    """A checkpoint operation failed for a reason a retry will not cure."""


class CheckpointCorrupt(CheckpointError):
    """Stored bytes do not rebuild a consistent state (missing base or deltas, truncated,
    foreign shape, seq skew, another conversation's identity)."""


class StaleDelete(CheckpointError):
    """A replayed delete record older than the conversation's current generation (which began
    after it): applying it again would erase turns published after the delete."""


class UnsafeRedisConfig(CheckpointError):
    """The Redis server (or our access to it) is configured so that the worker cannot run
    safely: checkpoints could vanish silently, or the credentials are refused. A restart
    cannot fix either, so the worker says so in one line and exits."""


class FingerprintMismatch(CheckpointError):
    """The conversation was written by a different model checkpoint.

    Continuing someone else's latent memory with another model would silently produce wrong
    embeddings, so this is an error, never a fallback."""

    def __init__(self, conversation_id: str, stored: str, expected: str) -> None:
        super().__init__(
            f"conversation {conversation_id!r} was checkpointed under model fingerprint "
            f"{stored!r}, but this worker runs {expected!r}; refusing to continue its memory "
            f"(delete it or route it to a worker with the matching model)"
        )
        self.conversation_id = conversation_id
        self.stored = stored
        self.expected = expected


# --------------------------------------------------------------------------------------------
# Boundary models (data that crosses into / out of Redis)


class SourceOffset(BaseModel):
    """Kafka position of the last turn reflected in a checkpoint (where a new owner resumes)."""

    model_config = ConfigDict(frozen=True)

    topic: str = Field(min_length=1)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class CheckpointMeta(BaseModel):
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
    def from_hash(cls, raw: dict[bytes, bytes]) -> "CheckpointMeta":
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
            raise CheckpointCorrupt(f"unreadable checkpoint meta {h!r}: {exc}") from exc


class MarkerInfo(BaseModel):
    """The long-lived marker beside a conversation's state (see module docstring)."""

    gen: int
    seq: int
    status: str
    at_ms: int = 0
    gap_rejects: int = 0
    deleted_at: tuple[int, int] | None = None  # (partition, offset) of the delete record

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "MarkerInfo | None":
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return cls(gen=int(h.get("gen", 0)), seq=int(h.get("seq", NO_SEQ)), status=h.get("status", "live"),
                       at_ms=int(h.get("at_ms", 0)), gap_rejects=int(h.get("gap_rejects", 0)),
                       deleted_at=(int(h["del_p"]), int(h["del_o"])) if h.get("del_p") else None)
        except ValueError:
            return None


class CheckpointInfo(BaseModel):
    """What `evostream inspect` prints about one conversation (JSON-able)."""

    conversation_id: str
    tenant: str | None
    keys: dict[str, str]
    whole: bool = Field(description="False: the checkpoint is incomplete or corrupt (quarantined)")
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


# --------------------------------------------------------------------------------------------
# Keys


class ConversationKeys(NamedTuple):
    meta: str
    base: str
    deltas: str
    outbox: str
    mark: str


def conversation_keys(namespace: str, ref: RefLike) -> ConversationKeys:
    """The five keys of a conversation; `{tag}` is the Redis-Cluster hash tag (one slot)."""
    ref = as_ref(ref)
    prefix = f"{namespace}:{{{ref.tag}}}:"
    return ConversationKeys(prefix + "meta", prefix + "base", prefix + "deltas", prefix + "outbox",
                            prefix + "mark")


# --------------------------------------------------------------------------------------------
# In-process values


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
    CORRUPT = "corrupt"  # part of the checkpoint is missing: quarantined, nothing written


@dataclass(frozen=True)
class CommitResult:
    ref: ConversationRef
    applied: bool  # the checkpoint now holds this commit (APPLIED or ALREADY_APPLIED)
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
class LoadedCheckpoint:
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

    @property
    def conversation_id(self) -> str:
        return self.ref.conversation_id

    @property
    def live(self) -> bool:
        return self.origin is MemoryOrigin.CONTINUED


@dataclass(frozen=True)
class CheckpointProblem:
    """A conversation that cannot be continued: its turns are dead-lettered with `code`."""

    ref: ConversationRef
    code: DeadLetterReason
    detail: str


_ORIGIN_BY_KIND = {
    "new": MemoryOrigin.NEW,
    "expired": MemoryOrigin.RESET_AFTER_EXPIRY,  # the marker outlived its state
    "deleted": MemoryOrigin.RESET_AFTER_DELETE,
    "reset": MemoryOrigin.RESET_BY_OPERATOR,
}


class _DeltaCounts:
    """Bounded memory of "conversation cid at seq s has n deltas since its base".

    The writer must decide *before* sending whether a commit appends or compacts (compacting
    means sending the full state). It knows the count from its own loads and commits; when it
    does not (evicted, or a state it did not load), it compacts, which is always correct."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._d: OrderedDict[ConversationRef, tuple[int, int]] = OrderedDict()
        self._max = max_entries

    def get(self, ref: ConversationRef, seq: int) -> int | None:
        hit = self._d.get(ref)
        if hit is None or hit[0] != seq:
            return None
        self._d.move_to_end(ref)
        return hit[1]

    def put(self, ref: ConversationRef, seq: int, n: int) -> None:
        self._d[ref] = (seq, n)
        self._d.move_to_end(ref)
        while len(self._d) > self._max:
            self._d.popitem(last=False)

    def drop(self, ref: ConversationRef) -> None:
        self._d.pop(ref, None)


@dataclass
class _Plan:
    ref: ConversationRef
    keys: ConversationKeys
    args: list[bytes]
    compact: bool

    @property
    def nbytes(self) -> int:
        return sum(len(k.encode()) for k in self.keys) + sum(len(a) for a in self.args)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))


def _stored_dtype(base: bytes, deltas: Sequence[bytes]) -> torch.dtype | None:
    """Latent dtype a stored chain was written in (byte 4 of a state's or delta's header),
    so a store whose storage_dtype setting changed still reads what is there (issue #14)."""
    raw = base or (deltas[0] if deltas else b"")
    return _CODE_DTYPES.get(raw[4]) if len(raw) > 4 else None


# --------------------------------------------------------------------------------------------
# The store


class CheckpointStore:
    """Per-conversation checkpoints in Redis (see module docstring for layout and semantics).

    One instance is one writer: commit a given conversation through it serially (the pipeline
    does, one batch at a time). Several instances (workers, zombies) may race on the same
    conversation; the (gen, seq) compare-and-set decides."""

    def __init__(
        self,
        redis_url: str,
        *,
        fingerprint: str,
        hidden_size: int,
        capacity: int,
        dtype: torch.dtype,
        namespace: str = "evostream",
        ttl_s: float | None = 7 * 24 * 3600,
        marker_ttl_s: float | None = 30 * 24 * 3600,
        compact_every: int = 32,
        socket_timeout_s: float = 5.0,
        writer_id: str | None = None,
        backoff: Backoff = Backoff(),
        durability: Durability = Durability.REPLY,
        durability_replicas: int = 1,
        durability_timeout_ms: int = 2000,
        storage_dtype: torch.dtype | None = None,
        ttl_by_tenant: dict[str, float | None] | None = None,
        cold: Any = None,
        redis_options: RedisOptions | None = None,
    ) -> None:
        if not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be non-empty and brace-free, got {namespace!r}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be positive or None")
        if marker_ttl_s is not None and marker_ttl_s <= 0:
            raise ValueError("marker_ttl_s must be positive or None")
        if compact_every < 0:
            raise ValueError("compact_every must be >= 0")
        if not fingerprint:
            raise ValueError("fingerprint must be non-empty")
        # --- capacity levers (issue #14) ---
        # storage_dtype: latents kept in Redis in this dtype (bfloat16 halves a float32 state);
        # states handed out round each turn's latents to it (ConversationState.storage_dtype),
        # so what is in memory is exactly what is stored.
        self.storage_dtype = storage_dtype if storage_dtype not in (None, dtype) else None
        # ttl_by_tenant: a tenant's own idle TTL (None = never); "" names the default tenant.
        for t, v in (ttl_by_tenant or {}).items():
            if v is not None and v <= 0:
                raise ValueError(f"ttl_by_tenant[{t!r}] must be positive or None")
        self.ttl_by_tenant = dict(ttl_by_tenant or {})
        self.cold = cold  # stream.state.cold_tier.ColdTier: idle conversations moved out of Redis
        self.fingerprint = fingerprint
        self.hidden_size = hidden_size
        self.capacity = capacity
        self.dtype = dtype
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.marker_ttl_s = marker_ttl_s
        self.compact_every = compact_every
        self.durability = Durability(durability)
        self.durability_replicas = durability_replicas
        self.durability_timeout_ms = durability_timeout_ms
        self.writer_id = writer_id or uuid.uuid4().hex[:16]  # shown by inspect: who wrote it
        # Keys the commit digest, so that only THIS instance's retry is recognised as "already
        # applied" (writer ids are configurable and need not be unique).
        self._digest_key = uuid.uuid4().bytes
        self._backoff = backoff
        self._where = describe_url(redis_url)  # no credentials
        # A short client-level retry absorbs one dropped connection; longer outages surface
        # as StoreUnavailable so the pipeline can pause instead of hanging inside redis-py.
        # make_redis (issue #8): standalone, rediss:// (TLS, ACL user), Sentinel or Cluster by
        # the URL scheme, through redis-py's own classes.
        self._redis: Redis = make_redis(
            redis_url, redis_options,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
        )
        self._commit_script = self._redis.register_script(_COMMIT_LUA)
        self._load_script = self._redis.register_script(_LOAD_LUA)
        self._end_script = self._redis.register_script(_END_LUA)
        self._counts = _DeltaCounts()

    def keys(self, ref: RefLike) -> ConversationKeys:
        return conversation_keys(self.namespace, ref)

    def ttl_for(self, tenant: str | None) -> float | None:
        """Idle TTL of a tenant's conversations (issue #14: per-tenant policy)."""
        return self.ttl_by_tenant.get(tenant or "", self.ttl_s)

    def _ttl_ms(self, tenant: str | None = None) -> int:
        ttl = self.ttl_for(tenant)
        return 0 if ttl is None else max(1, round(ttl * 1000))

    def _mark_ttl_ms(self, ending: bool = False, tenant: str | None = None) -> int:
        """A live marker outlives the state by marker_ttl_s; a tombstone lives marker_ttl_s."""
        ttl = self.ttl_for(tenant)
        if self.marker_ttl_s is None or (ttl is None and not ending):
            return 0
        extra = 0 if ending else ttl or 0
        return max(1, round((self.marker_ttl_s + extra) * 1000))

    def _durability_tail(self) -> list[tuple[str, ...]]:
        """Commands appended to a write pipeline (same connection, after the writes) that
        return only once the writes are as durable as configured."""
        t = str(self.durability_timeout_ms)
        d = self.durability
        if d is Durability.AOF:
            return [("WAITAOF", "1", "0", t)]
        if d is Durability.REPLICAS:
            return [("WAIT", str(self.durability_replicas), t)]
        if d is Durability.AOF_AND_REPLICAS:
            return [("WAITAOF", "1", str(self.durability_replicas), t)]
        return []

    def _check_durable(self, replies: list[Any]) -> None:
        d = self.durability
        for reply in replies:
            if isinstance(reply, Exception):
                if is_unavailable(reply):  # e.g. the primary was just demoted (Sentinel failover, issue #8)
                    raise StoreUnavailable(f"durability wait ({d.value}) on {self._where}: {reply}") from reply
                raise CheckpointError(f"durability wait ({d.value}) failed on {self._where}: {reply}") from reply
            local, replicas = (int(reply[0]), int(reply[1])) if isinstance(reply, list) else (1, int(reply))
            need_local = d in (Durability.AOF, Durability.AOF_AND_REPLICAS)
            need_replicas = self.durability_replicas if d in (Durability.REPLICAS, Durability.AOF_AND_REPLICAS) else 0
            if (need_local and local < 1) or replicas < need_replicas:
                # Written but not yet durable: not acknowledged; the retry finds it applied
                # (ALREADY_APPLIED) and waits again.
                raise StoreUnavailable(
                    f"{self._where}: writes not durable within {self.durability_timeout_ms} ms "
                    f"(fsynced locally: {local}, replicas: {replicas}, durability={d.value})")

    # --- script plumbing ---------------------------------------------------------------------
    async def _run_script(self, script: AsyncScript,
                          calls: list[tuple[Sequence[str], Sequence[bytes]]],
                          what: str, *, durable: bool = False) -> list[Any]:
        """EVALSHA `script` once per call in ONE pipeline round trip.

        redis-py's own script-in-pipeline support adds a SCRIPT EXISTS round trip to every
        execute; instead we send EVALSHA blind and, only for the calls answered NOSCRIPT (the
        server restarted or its script cache was flushed; those calls did not run), load the
        script and resend them. `durable`: end the pipeline with the durability wait."""
        out: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        tail = self._durability_tail() if durable else []
        for _ in range(3):
            with unavailable_as(f"{what} on {self._where}"):
                pipe = self._redis.pipeline(transaction=False)
                for i in pending:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                for cmd in tail:
                    pipe.execute_command(*cmd)
                replies = await pipe.execute(raise_on_error=False)
            if tail:
                self._check_durable(replies[len(pending):])
                replies = replies[: len(pending)]
            missing = []
            for i, reply in zip(pending, replies):
                if isinstance(reply, rex.NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    if is_unavailable(reply):
                        raise StoreUnavailable(f"{what} on {self._where}: {reply}") from reply
                    raise CheckpointError(f"{what} failed: {reply}") from reply
                else:
                    out[i] = reply
            if not missing:
                return out
            log.warning("%s: script not in the server's cache (restart or SCRIPT FLUSH); "
                        "loading it and resending %d call(s)", self._where, len(missing))
            with unavailable_as(f"SCRIPT LOAD on {self._where}"):
                script.sha = await self._redis.script_load(script.script)
            pending = missing
        raise CheckpointError(f"{what}: script kept disappearing from {self._where}")

    # --- reads -------------------------------------------------------------------------------
    async def load(self, ref: RefLike) -> LoadedCheckpoint | None:
        """The conversation's live state, seq, pending outbox and source offset; None if it
        has no live state (unknown, deleted, expired, reset).

        Raises FingerprintMismatch (written under another model) or CheckpointCorrupt
        (incomplete or inconsistent checkpoint)."""
        ref = as_ref(ref)
        got = (await self.load_many([ref]))[ref]
        if isinstance(got, CheckpointProblem):
            if got.code is DeadLetterReason.FINGERPRINT_MISMATCH:
                raise FingerprintMismatch(ref.conversation_id, got.detail, self.fingerprint)
            raise CheckpointCorrupt(got.detail)
        return got if got.live else None

    async def load_many(self, refs: list[RefLike]) -> dict[Any, LoadedCheckpoint | CheckpointProblem]:
        """Where each conversation stands (one round trip; each read atomic on its own),
        keyed by what the caller passed (refs, or bare ids of the default tenant).

        Never raises for one conversation's bad checkpoint: that conversation's entry is a
        CheckpointProblem, and every other one loads."""
        given = list(dict.fromkeys(refs))
        unique = [as_ref(r) for r in given]
        if not unique:
            return {}
        replies = await self._run_script(
            self._load_script, [(self.keys(r), ()) for r in unique], "load")
        cold = [i for i, r in enumerate(replies) if r[0] in (b"cold", "cold")]
        if cold and self.cold is not None:  # issue #14: bring idle conversations back, exactly
            await self.cold.thaw(self, [unique[i] for i in cold])
            again = await self._run_script(
                self._load_script, [(self.keys(unique[i]), ()) for i in cold], "load")
            for i, r in zip(cold, again):
                replies[i] = r
        out: dict[Any, LoadedCheckpoint | CheckpointProblem] = {}
        for key, ref, reply in zip(given, unique, replies):
            try:
                out[key] = self._decode(ref, reply)
            except FingerprintMismatch as exc:
                self._counts.drop(ref)
                out[key] = CheckpointProblem(ref, DeadLetterReason.FINGERPRINT_MISMATCH, exc.stored)
            except CheckpointCorrupt as exc:
                self._counts.drop(ref)
                out[key] = CheckpointProblem(
                    ref, DeadLetterReason.TENANT_MISMATCH if "identity" in str(exc) else DeadLetterReason.CHECKPOINT_CORRUPT,
                    str(exc))
        return out

    # --- storage dtype (issue #14): conversion at the store boundary ------------------------
    def _state_bytes(self, st: ConversationState) -> bytes:
        if self.storage_dtype is None:
            return st.to_bytes()
        return ConversationState(
            hidden_size=st.hidden_size, capacity=st.capacity, dtype=self.storage_dtype,
            latents=st.latents.to(self.storage_dtype), snapshot_len=st.snapshot_len,
            segment_token_ids=st.segment_token_ids, seq=st.seq).to_bytes()

    def _delta_bytes(self, d: StateDelta) -> bytes:
        if self.storage_dtype is None:
            return d.to_bytes()
        return StateDelta(seq=d.seq, new_segment=d.new_segment, token_ids=d.token_ids,
                          latents=d.latents.to(self.storage_dtype), prev_seq=d.prev_seq).to_bytes()

    def _decode(self, ref: ConversationRef, reply: list[Any]) -> LoadedCheckpoint:
        kind, gen, seq, meta_flat, base, deltas, outbox_flat, mark_flat = reply
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        gen, seq = int(gen), int(seq)
        marker = MarkerInfo.from_hash(_pairs(mark_flat))
        if kind == "corrupt":
            raise CheckpointCorrupt(
                f"conversation {ref}: state keys without their meta (meta evicted or deleted by hand)")
        if kind == "cold":  # issue #14: moved to the cold tier; never mistake it for a new one
            why = self.cold.why_missing(ref) if self.cold is not None else None  # issue #17: a bad shard says so
            raise CheckpointCorrupt(
                f"conversation {ref}: its state was moved to the cold tier and could not be brought back ("
                + (why or "no cold tier configured: EVOSTREAM_COLD_TIER_PATH, or its copy is gone") + ")")
        if kind != "live":
            self._counts.drop(ref)
            empty = ConversationState(hidden_size=self.hidden_size, capacity=self.capacity, dtype=self.dtype,
                                      storage_dtype=self.storage_dtype)
            empty.seq = seq
            origin = _ORIGIN_BY_KIND.get(kind, MemoryOrigin.NEW)
            return LoadedCheckpoint(ref=ref, state=empty, seq=seq, gen=gen, origin=origin, outbox={},
                                    source=None, n_deltas=0, gap_rejects=marker.gap_rejects if marker else 0,
                                    deleted_at=marker.deleted_at if marker and kind == "deleted" else None)
        meta = CheckpointMeta.from_hash(_pairs(meta_flat))
        if meta.conversation_id is not None and (meta.conversation_id, meta.tenant) != (ref.conversation_id, ref.tenant):
            raise CheckpointCorrupt(
                f"conversation {ref}: stored identity {meta.tenant!r}/{meta.conversation_id!r} differs")
        if meta.fingerprint != self.fingerprint:
            raise FingerprintMismatch(ref.conversation_id, meta.fingerprint, self.fingerprint)
        if meta.base_seq >= 0 and not base:
            raise CheckpointCorrupt(f"conversation {ref}: base at seq {meta.base_seq} is missing (evicted?)")
        stored_dtype = _stored_dtype(base, deltas) or self.storage_dtype or self.dtype
        try:
            state = rebuild(base or None, list(deltas), hidden_size=self.hidden_size,
                            capacity=self.capacity, dtype=stored_dtype)
        except StateFormatError as exc:
            raise CheckpointCorrupt(f"conversation {ref}: {exc}") from exc
        if base and state.seq < meta.base_seq:
            raise CheckpointCorrupt(f"conversation {ref}: base stands at seq {state.seq}, meta says {meta.base_seq}")
        if state.seq != meta.seq:
            raise CheckpointCorrupt(
                f"conversation {ref}: rebuilt seq {state.seq} != stored seq {meta.seq} (deltas missing?)")
        widening = self.dtype == torch.float32 and state.dtype in (torch.bfloat16, torch.float16)  # exact
        if (state.hidden_size, state.capacity) != (self.hidden_size, self.capacity) or not (
                state.dtype in (self.dtype, self.storage_dtype) or widening):
            raise CheckpointCorrupt(
                f"conversation {ref}: stored shape (hidden={state.hidden_size}, "
                f"capacity={state.capacity}, {state.dtype}) does not match this store")
        if state.dtype != self.dtype:  # stored in storage_dtype: compute in self.dtype (exact widening)
            state.latents, state.dtype = state.latents.to(self.dtype), self.dtype
        state.storage_dtype = self.storage_dtype
        if stored_dtype == (self.storage_dtype or self.dtype):
            self._counts.put(ref, meta.seq, len(deltas))
        else:  # stored under the other dtype setting: the next commit rewrites it whole (compacts)
            self._counts.drop(ref)
        return LoadedCheckpoint(
            ref=ref, state=state, seq=meta.seq, gen=meta.gen, origin=MemoryOrigin.CONTINUED,
            outbox={int(k): v for k, v in _pairs(outbox_flat).items()},
            source=meta.source, n_deltas=len(deltas), updated_at_ms=meta.updated_at_ms,
            gap_rejects=marker.gap_rejects if marker else 0, gen_start=meta.gen_start,
        )

    async def inspect(self, ref: RefLike) -> dict | None:
        """Operator view of one conversation (sizes, TTL, outbox, offsets, whether it is
        whole, its marker); None if nothing at all is stored for it."""
        ref = as_ref(ref)
        k = self.keys(ref)
        with unavailable_as(f"inspect on {self._where}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(k.meta)
            pipe.strlen(k.base)
            pipe.lrange(k.deltas, 0, -1)
            pipe.hkeys(k.outbox)
            pipe.pttl(k.meta)
            pipe.hgetall(k.mark)
            raw_meta, base_len, deltas, outbox_keys, pttl, raw_mark = await pipe.execute()
        marker = MarkerInfo.from_hash(raw_mark)
        if not raw_meta and not base_len and not deltas and marker is None:
            return None
        problem: str | None = None
        got = (await self.load_many([ref]))[ref]
        if isinstance(got, CheckpointProblem):
            problem = f"{got.code.value}: {got.detail}"
        meta = None
        if raw_meta:
            try:
                meta = CheckpointMeta.from_hash(raw_meta)
            except CheckpointCorrupt as exc:
                problem = problem or str(exc)
        sizes = [len(d) for d in deltas]
        info = CheckpointInfo(
            conversation_id=ref.conversation_id, tenant=ref.tenant, keys=k._asdict(),
            whole=problem is None, problem=problem,
            seq=meta.seq if meta else None, gen=meta.gen if meta else None,
            base_seq=meta.base_seq if meta else None, n_deltas=len(deltas),
            fingerprint=meta.fingerprint if meta else None,
            fingerprint_matches=(meta.fingerprint == self.fingerprint) if meta else None,
            writer=meta.writer if meta else None, updated_at_ms=meta.updated_at_ms if meta else None,
            source=meta.source if meta else None,
            base_bytes=int(base_len), delta_bytes=sum(sizes), delta_sizes=sizes,
            outbox_seqs=sorted(int(s) for s in outbox_keys),
            ttl_s=pttl / 1000.0 if pttl >= 0 else None, marker=marker,
        )
        return info.model_dump(mode="json")

    # --- writes ------------------------------------------------------------------------------
    def _plan(self, c: TurnCommit) -> _Plan:
        st = c.state
        if (st.hidden_size, st.capacity, st.dtype) != (self.hidden_size, self.capacity, self.dtype):
            raise ValueError(
                f"{c.ref}: state (hidden={st.hidden_size}, capacity={st.capacity}, "
                f"{st.dtype}) does not match this store")
        delta_bytes = [self._delta_bytes(d) for d in c.deltas]
        # Identifies this exact commit BY THIS WRITER, so a retry whose first reply was lost is
        # recognised. Another writer whose deltas happen to be bit-identical (a zombie that
        # computed the same turn in a batch of the same shape) must not pass as that retry: it
        # would emit its own embedding of the turn, which can differ in the last bits from the
        # one the winner committed to the outbox. It gets STALE, re-reads, and replays the
        # winner's event instead.
        digest = hashlib.blake2b(digest_size=16, key=self._digest_key)
        for b in delta_bytes:
            digest.update(len(b).to_bytes(8, "little"))
            digest.update(b)
        # A chain without a base must start at NO_SEQ (that is how a load checks it is whole);
        # a generation that restarts after seq s (delete/expiry/reset) is anchored by a base.
        known = 0 if c.expected_seq == NO_SEQ else None if c.fresh else self._counts.get(c.ref, c.expected_seq)
        compact = known is None or known + len(delta_bytes) > self.compact_every
        payload = [self._state_bytes(st)] if compact else delta_bytes
        src = c.source
        head: list[str | int] = [
            c.expected_gen, c.expected_seq, st.seq, self.fingerprint, self.writer_id, digest.hexdigest(),
            "c" if compact else "d", self._ttl_ms(c.ref.tenant),
            src.topic if src else "", src.partition if src else 0, src.offset if src else 0,
            len(payload), len(c.outbox), self._mark_ttl_ms(tenant=c.ref.tenant), c.ref.tenant or "", c.ref.conversation_id,
            c.gen_start[0] if c.gen_start else "", c.gen_start[1] if c.gen_start else 0,
        ]
        args = [str(a).encode() for a in head] + payload
        for seq, event in sorted(c.outbox.items()):
            args += [str(int(seq)).encode(), bytes(event)]
        return _Plan(c.ref, self.keys(c.ref), args, compact)

    async def commit(self, commits: list[TurnCommit]) -> list[CommitResult]:
        """Write a batch: per conversation atomic CAS on (gen, seq), all in one round trip,
        followed by the configured durability wait.

        Results are in input order. A conversation whose view differs from the commit's
        expectation is left untouched (status STALE, `stored_seq` tells where it is): the
        caller must drop its in-memory state and reload. Raises StoreUnavailable (nothing
        lost: retry the same batch after `wait_until_available`; commits that did land are
        reported ALREADY_APPLIED on the retry)."""
        if not commits:
            return []
        refs = [c.ref for c in commits]
        if len(set(refs)) != len(refs):
            raise ValueError("one commit per conversation per batch (merge its turns' deltas)")
        plans = [self._plan(c) for c in commits]
        replies = await self._run_script(
            self._commit_script, [(p.keys, p.args) for p in plans], "commit", durable=True)
        results = []
        for plan, reply in zip(plans, replies):
            code, stored_seq, n_deltas, compacted, gen = (int(x) for x in reply)
            status = {_APPLIED: CommitStatus.APPLIED, _STALE: CommitStatus.STALE,
                      _FINGERPRINT: CommitStatus.FINGERPRINT,
                      _ALREADY_APPLIED: CommitStatus.ALREADY_APPLIED,
                      _CORRUPT: CommitStatus.CORRUPT}[code]
            applied = status in (CommitStatus.APPLIED, CommitStatus.ALREADY_APPLIED)
            if applied:
                self._counts.put(plan.ref, stored_seq, n_deltas)
            else:
                self._counts.drop(plan.ref)
                log.info("checkpoint %s not applied (%s): stored seq %d", plan.ref,
                         status.value, stored_seq)
            results.append(CommitResult(
                ref=plan.ref, applied=applied, stored_seq=stored_seq,
                compacted=bool(compacted), bytes_written=plan.nbytes, status=status,
                n_deltas=n_deltas, gen=gen,
            ))
        return results

    async def ack_emitted(self, emitted: dict[RefLike, list[int]]) -> None:
        """Drop outbox events the broker confirmed (one round trip). Idempotent."""
        todo = {as_ref(ref): seqs for ref, seqs in emitted.items() if seqs}
        if not todo:
            return
        with unavailable_as(f"ack_emitted on {self._where}"):
            pipe = self._redis.pipeline(transaction=False)
            for ref, seqs in todo.items():
                pipe.hdel(self.keys(ref).outbox, *(str(int(s)) for s in seqs))
            await pipe.execute()

    async def _end(self, ref: RefLike, status: str, at: tuple[int, int] | None = None) -> tuple[int, int]:
        ref = as_ref(ref)
        self._counts.drop(ref)
        args = [status.encode(), str(self._mark_ttl_ms(ending=True)).encode(),
                (ref.tenant or "").encode(), ref.conversation_id.encode(),
                str(at[0]).encode() if at else b"", str(at[1] if at else 0).encode()]
        existed, last_seq, _gen = (await self._run_script(
            self._end_script, [(self.keys(ref), args)], status, durable=True))[0]
        existed = int(existed)
        if existed >= 0 and self.cold is not None:  # issue #14: a cold copy must not outlive a delete/reset
            existed = int(await self.cold.discard(ref)) or existed
        return existed, int(last_seq)

    async def delete(self, ref: RefLike, at: tuple[int, int] | None = None) -> tuple[bool, int]:
        """End the conversation's memory for good: drop its state, leave a tombstone that no
        writer (stale or not) can commit past. `at` = (partition, offset) of the delete record:
        a replayed delete older than the conversation's live generation changes nothing and
        raises StaleDelete. Returns (anything existed, last applied seq)."""
        existed, last_seq = await self._end(ref, "deleted", at)
        if existed < 0:
            raise StaleDelete(f"delete of {as_ref(ref)} at {at} is older than its live generation")
        return bool(existed), last_seq

    async def reset(self, ref: RefLike) -> tuple[bool, int]:
        """Operator repair of a quarantined (or any) conversation: drop its state; its next
        turn starts an empty memory (`memory: reset_by_operator`)."""
        existed, last_seq = await self._end(ref, "reset")
        return existed > 0, last_seq

    async def note_gap_rejected(self, ref: RefLike) -> int:
        """Count one more turn dead-lettered for a seq gap; returns the count since the last
        applied turn (kept in the marker, so every worker sees it)."""
        ref = as_ref(ref)
        k = self.keys(ref)
        with unavailable_as(f"gap count on {self._where}"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrby(k.mark, "gap_rejects", 1)
            pipe.hset(k.mark, mapping={"tenant": ref.tenant or "", "cid": ref.conversation_id})
            ttl = self._mark_ttl_ms(ending=True)
            if ttl:
                pipe.pexpire(k.mark, ttl)
            n, *_ = await pipe.execute()
        return int(n)

    # --- availability ------------------------------------------------------------------------
    async def ping(self) -> bool:
        """True if Redis answers now; never raises for an unreachable server."""
        try:
            return bool(await self._redis.ping())
        except Exception as exc:  # noqa: BLE001
            if is_unavailable(exc):
                return False
            raise

    async def wait_until_available(self, max_wait_s: float | None = None) -> None:
        """Block (asynchronously) until Redis answers; exponential backoff with jitter.

        None waits for ever; otherwise StoreUnavailable after `max_wait_s`."""

        async def probe() -> None:
            with unavailable_as(self._where):
                await self._redis.ping()

        await wait_until(probe, what=f"checkpoint store ({self._where})",
                         max_wait_s=max_wait_s, backoff=self._backoff)

    async def check_credentials(self) -> None:
        """Raise UnsafeRedisConfig if Redis refuses our credentials (wrong password, an ACL
        user without the needed permissions). redis-py reports those as connection errors,
        which the pipeline would otherwise wait out for ever; any other failure (not reachable
        yet) is left to `wait_until_available`."""
        try:
            await self._redis.ping()
        except (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError,
                rex.AuthenticationWrongNumberOfArgsError) as exc:
            raise UnsafeRedisConfig(
                f"{self._where} refused the configured credentials ({type(exc).__name__}: {exc}); "
                f"check the user and password in EVOSTREAM_REDIS_URL") from exc
        except Exception:  # noqa: BLE001 - unreachable and the like: waited for by the caller
            return

    async def check_server(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that could lose checkpoints silently, with the reason and the fix:
        an eviction policy other than `noeviction` (any key with a TTL — all of ours — may be
        evicted alone), or a durability setting the server cannot honour (WAITAOF without
        appendonly). Returns what was read (for the start-up log)."""
        with unavailable_as(f"INFO on {self._where}"):
            mem = await self._redis.info("memory")
            pers = await self._redis.info("persistence")
        policy = str(mem.get("maxmemory_policy", "unknown"))
        aof = str(pers.get("aof_enabled", "0"))
        if policy != "noeviction" and not allow_eviction:
            raise UnsafeRedisConfig(
                f"{self._where} has maxmemory-policy {policy}: Redis may evict one key of a "
                f"conversation and lose or truncate its memory; set maxmemory-policy noeviction "
                f"(or EVOSTREAM_REDIS_ALLOW_EVICTION=true to accept quarantined conversations)")
        if self.durability in (Durability.AOF, Durability.AOF_AND_REPLICAS) and aof != "1":
            raise UnsafeRedisConfig(
                f"{self._where} has appendonly off, so EVOSTREAM_REDIS_DURABILITY={self.durability.value} "
                f"cannot be honoured; enable appendonly (appendfsync everysec or always) or choose "
                f"another durability")
        return {"maxmemory_policy": policy, "aof_enabled": aof}

    async def prepare(self) -> None:
        """Load the scripts into the server's cache up front (so the first batch does not
        pay, and log, a NOSCRIPT round trip)."""
        with unavailable_as(f"SCRIPT LOAD on {self._where}"):
            for script in (self._commit_script, self._load_script, self._end_script):
                script.sha = await self._redis.script_load(script.script)

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> "CheckpointStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
