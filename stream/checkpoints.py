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

Key layout (all keys of one conversation share the Redis-Cluster hash tag `{cid}`, so the
script's keys live in one slot):

    <ns>:{<cid>}:meta    hash   seq, n_deltas, fp (model fingerprint), writer, digest,
                                updated_at_ms, src_topic, src_partition, src_offset
    <ns>:{<cid>}:base    string ConversationState.to_bytes() at the last compaction (absent
                                until the first compaction)
    <ns>:{<cid>}:deltas  list   StateDelta.to_bytes(), one per turn since the base
    <ns>:{<cid>}:outbox  hash   seq -> encoded embedding event (until acked)

Every key's TTL is refreshed on each commit, so idle conversations expire together.
Requires Redis >= 6.2 or Valkey (scripts use TIME followed by writes, multi-field HSET).
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

from stream.recovery import Backoff, StoreUnavailable, is_unavailable, unavailable_as, wait_until
from workers.state import NO_SEQ, ConversationState, StateDelta, StateFormatError, rebuild

__all__ = [
    "CheckpointCorrupt", "CheckpointError", "CheckpointStore", "CommitResult", "CommitStatus",
    "ConversationKeys", "FingerprintMismatch", "LoadedCheckpoint", "SourceOffset",
    "StoreUnavailable", "TurnCommit", "conversation_keys",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Lua. Status codes returned by the commit script (first element of its reply).
_APPLIED, _STALE, _FINGERPRINT, _ALREADY_APPLIED = 1, 0, 2, 3

# KEYS: meta, base, deltas, outbox.
# ARGV: expected_seq, new_seq, fp, writer, digest, mode ("d" append deltas | "c" compact),
#       ttl_ms (0 = persist), src_topic ("" = none), src_partition, src_offset,
#       n_payload, n_outbox, payload..., outbox (seq, event)...
# Reply: {status, stored_seq, n_deltas, compacted}
_COMMIT_LUA = """
local meta, base, deltas, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expected, new_seq = tonumber(ARGV[1]), ARGV[2]
local fp, writer, digest, mode = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ttl_ms = tonumber(ARGV[7])
local n_payload, n_outbox = tonumber(ARGV[11]), tonumber(ARGV[12])

local cur = redis.call('HMGET', meta, 'seq', 'fp', 'digest')
local stored = -1
if cur[1] then stored = tonumber(cur[1]) end
if cur[1] and cur[2] ~= fp then
  return {2, stored, redis.call('LLEN', deltas), 0}
end
if stored ~= expected then
  if cur[1] == new_seq and cur[3] == digest then
    -- our own commit, retried after its reply was lost: report success, change nothing
    return {3, stored, redis.call('LLEN', deltas), 0}
  end
  return {0, stored, redis.call('LLEN', deltas), 0}
end

if stored == -1 then
  -- no meta: leftovers of an expired or half-deleted conversation must not leak in
  redis.call('DEL', base, deltas, outbox)
end
local i = 13
local compacted = 0
if mode == 'c' then
  redis.call('SET', base, ARGV[i])
  redis.call('DEL', deltas)
  compacted = 1
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
redis.call('HSET', meta, 'seq', new_seq, 'n_deltas', n, 'fp', fp, 'writer', writer,
           'digest', digest, 'updated_at_ms', now_ms)
if ARGV[8] ~= '' then
  redis.call('HSET', meta, 'src_topic', ARGV[8], 'src_partition', ARGV[9], 'src_offset', ARGV[10])
else
  redis.call('HDEL', meta, 'src_topic', 'src_partition', 'src_offset')
end
for _, k in ipairs(KEYS) do
  if ttl_ms > 0 then redis.call('PEXPIRE', k, ttl_ms) else redis.call('PERSIST', k) end
end
return {1, tonumber(new_seq), n, compacted}
"""

# One consistent read of a conversation (a commit cannot interleave between the four reads).
_LOAD_LUA = """
local m = redis.call('HGETALL', KEYS[1])
if #m == 0 then return {} end
return {m, redis.call('GET', KEYS[2]), redis.call('LRANGE', KEYS[3], 0, -1),
        redis.call('HGETALL', KEYS[4])}
"""


# --------------------------------------------------------------------------------------------
# Errors


class CheckpointError(RuntimeError):
    """A checkpoint operation failed for a reason a retry will not cure."""


class CheckpointCorrupt(CheckpointError):
    """Stored bytes do not rebuild a consistent state (truncated, foreign shape, seq skew)."""


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
    n_deltas: int = Field(ge=0)
    fingerprint: str
    writer: str = ""
    updated_at_ms: int = 0
    source: SourceOffset | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "CheckpointMeta":
        h = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            source = (
                SourceOffset(topic=h["src_topic"], partition=int(h["src_partition"]),
                             offset=int(h["src_offset"]))
                if h.get("src_topic") else None
            )
            return cls(seq=int(h["seq"]), n_deltas=int(h.get("n_deltas", 0)),
                       fingerprint=h.get("fp", ""), writer=h.get("writer", ""),
                       updated_at_ms=int(h.get("updated_at_ms", 0)), source=source)
        except (KeyError, ValueError) as exc:
            raise CheckpointCorrupt(f"unreadable checkpoint meta {h!r}: {exc}") from exc


class CheckpointInfo(BaseModel):
    """What `evostream inspect` prints about one conversation (JSON-able)."""

    conversation_id: str
    keys: dict[str, str]
    seq: int
    n_deltas: int
    fingerprint: str
    fingerprint_matches: bool
    writer: str
    updated_at_ms: int
    source: SourceOffset | None
    base_bytes: int
    delta_bytes: int
    delta_sizes: list[int]
    outbox_seqs: list[int]
    ttl_s: float | None = Field(description="seconds until the meta key expires; None = never")


# --------------------------------------------------------------------------------------------
# Keys


class ConversationKeys(NamedTuple):
    meta: str
    base: str
    deltas: str
    outbox: str


def conversation_keys(namespace: str, conversation_id: str) -> ConversationKeys:
    """The four keys of a conversation; `{cid}` is the Redis-Cluster hash tag.

    A cid containing braces still yields one slot for all four keys (they share the prefix up
    to the first `}`), and keys of two cids cannot collide because no suffix is a suffix of
    another."""
    if not conversation_id:
        raise ValueError("conversation_id must be non-empty")
    prefix = f"{namespace}:{{{conversation_id}}}:"
    return ConversationKeys(prefix + "meta", prefix + "base", prefix + "deltas", prefix + "outbox")


# --------------------------------------------------------------------------------------------
# In-process values


@dataclass
class TurnCommit:
    """One conversation's part of a batch: the state after its turns and how it got there."""

    conversation_id: str
    expected_seq: int  # seq the writer started from (NO_SEQ for a new conversation)
    state: ConversationState  # after the turns
    deltas: list[StateDelta]  # in order; deltas[-1].seq == state.seq
    outbox: dict[int, bytes] = field(default_factory=dict)  # seq -> encoded embedding event
    source: SourceOffset | None = None

    def __post_init__(self) -> None:
        if not self.deltas:
            raise ValueError(f"{self.conversation_id}: a commit needs at least one delta")
        seqs = [d.seq for d in self.deltas]
        if any(b <= a for a, b in zip(seqs, seqs[1:])):
            raise ValueError(f"{self.conversation_id}: delta seqs not increasing: {seqs}")
        if seqs[-1] != self.state.seq:
            raise ValueError(f"{self.conversation_id}: last delta seq {seqs[-1]} != state seq "
                             f"{self.state.seq}")
        if self.expected_seq < NO_SEQ or seqs[0] <= self.expected_seq:
            raise ValueError(f"{self.conversation_id}: deltas start at {seqs[0]} but "
                             f"expected_seq is {self.expected_seq}")


class CommitStatus(str, Enum):
    APPLIED = "applied"
    ALREADY_APPLIED = "already_applied"  # this exact commit was stored before (a retry)
    STALE = "stale"  # stored seq != expected_seq: someone else advanced it (or a replay)
    FINGERPRINT = "fingerprint"  # stored under another model fingerprint


@dataclass(frozen=True)
class CommitResult:
    conversation_id: str
    applied: bool  # the checkpoint now holds this commit (APPLIED or ALREADY_APPLIED)
    stored_seq: int  # seq stored after the call
    compacted: bool  # this commit wrote a new base
    bytes_written: int  # payload bytes sent for this conversation (keys + script arguments)
    status: CommitStatus = CommitStatus.APPLIED
    n_deltas: int = 0  # deltas stored since the base after the call


@dataclass
class LoadedCheckpoint:
    conversation_id: str
    state: ConversationState
    seq: int
    outbox: dict[int, bytes]  # events committed but not yet acked, by seq
    source: SourceOffset | None
    n_deltas: int
    updated_at_ms: int = 0


class _DeltaCounts:
    """Bounded memory of "conversation cid at seq s has n deltas since its base".

    The writer must decide *before* sending whether a commit appends or compacts (compacting
    means sending the full state). It knows the count from its own loads and commits; when it
    does not (evicted, or a state it did not load), it compacts, which is always correct."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._d: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._max = max_entries

    def get(self, cid: str, seq: int) -> int | None:
        if seq == NO_SEQ:
            return 0
        hit = self._d.get(cid)
        if hit is None or hit[0] != seq:
            return None
        self._d.move_to_end(cid)
        return hit[1]

    def put(self, cid: str, seq: int, n: int) -> None:
        self._d[cid] = (seq, n)
        self._d.move_to_end(cid)
        while len(self._d) > self._max:
            self._d.popitem(last=False)

    def drop(self, cid: str) -> None:
        self._d.pop(cid, None)


@dataclass
class _Plan:
    cid: str
    keys: ConversationKeys
    args: list[bytes]
    compact: bool

    @property
    def nbytes(self) -> int:
        return sum(len(k.encode()) for k in self.keys) + sum(len(a) for a in self.args)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))


# --------------------------------------------------------------------------------------------
# The store


class CheckpointStore:
    """Per-conversation checkpoints in Redis (see module docstring for layout and semantics).

    One instance is one writer: commit a given conversation through it serially (the pipeline
    does, one batch at a time). Several instances (workers, zombies) may race on the same
    conversation; the seq compare-and-set decides."""

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
        compact_every: int = 32,
        socket_timeout_s: float = 5.0,
        writer_id: str | None = None,
        backoff: Backoff = Backoff(),
    ) -> None:
        if not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be non-empty and brace-free, got {namespace!r}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be positive or None")
        if compact_every < 0:
            raise ValueError("compact_every must be >= 0")
        if not fingerprint:
            raise ValueError("fingerprint must be non-empty")
        self.fingerprint = fingerprint
        self.hidden_size = hidden_size
        self.capacity = capacity
        self.dtype = dtype
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.compact_every = compact_every
        self.writer_id = writer_id or uuid.uuid4().hex[:16]  # shown by inspect: who wrote it
        # Keys the commit digest, so that only THIS instance's retry is recognised as "already
        # applied" (writer ids are configurable and need not be unique).
        self._digest_key = uuid.uuid4().bytes
        self._backoff = backoff
        u = urlsplit(redis_url)
        self._where = f"redis {u.hostname}:{u.port or 6379}{u.path or ''}"  # no credentials
        # A short client-level retry absorbs one dropped connection; longer outages surface
        # as StoreUnavailable so the pipeline can pause instead of hanging inside redis-py.
        self._redis: Redis = Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
        )
        self._commit_script = self._redis.register_script(_COMMIT_LUA)
        self._load_script = self._redis.register_script(_LOAD_LUA)
        self._counts = _DeltaCounts()

    def keys(self, conversation_id: str) -> ConversationKeys:
        return conversation_keys(self.namespace, conversation_id)

    # --- script plumbing ---------------------------------------------------------------------
    async def _run_script(self, script: AsyncScript,
                          calls: list[tuple[Sequence[str], Sequence[bytes]]],
                          what: str) -> list[Any]:
        """EVALSHA `script` once per call in ONE pipeline round trip.

        redis-py's own script-in-pipeline support adds a SCRIPT EXISTS round trip to every
        execute; instead we send EVALSHA blind and, only for the calls answered NOSCRIPT (the
        server restarted or its script cache was flushed; those calls did not run), load the
        script and resend them."""
        out: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(3):
            with unavailable_as(f"{what} on {self._where}"):
                pipe = self._redis.pipeline(transaction=False)
                for i in pending:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
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
    async def load(self, cid: str) -> LoadedCheckpoint | None:
        """The conversation's state, seq, pending outbox and source offset; None if unknown.

        Raises FingerprintMismatch if it was written under another model checkpoint."""
        return (await self.load_many([cid]))[cid]

    async def load_many(self, cids: list[str]) -> dict[str, LoadedCheckpoint | None]:
        """`load` for many conversations in one round trip (each read is atomic on its own).

        Raises FingerprintMismatch on the first foreign conversation."""
        unique = list(dict.fromkeys(cids))
        if not unique:
            return {}
        replies = await self._run_script(
            self._load_script, [(self.keys(c), ()) for c in unique], "load")
        return {cid: self._decode(cid, reply) for cid, reply in zip(unique, replies)}

    def _decode(self, cid: str, reply: list[Any]) -> LoadedCheckpoint | None:
        if not reply:
            self._counts.drop(cid)
            return None
        meta_flat, base, deltas, outbox_flat = reply
        meta = CheckpointMeta.from_hash(_pairs(meta_flat))
        if meta.fingerprint != self.fingerprint:
            raise FingerprintMismatch(cid, meta.fingerprint, self.fingerprint)
        try:
            state = rebuild(base, list(deltas), hidden_size=self.hidden_size,
                            capacity=self.capacity, dtype=self.dtype)
        except StateFormatError as exc:
            raise CheckpointCorrupt(f"conversation {cid!r}: {exc}") from exc
        if state.seq != meta.seq:
            raise CheckpointCorrupt(
                f"conversation {cid!r}: rebuilt seq {state.seq} != stored seq {meta.seq}")
        if (state.hidden_size, state.capacity, state.dtype) != (
                self.hidden_size, self.capacity, self.dtype):
            raise CheckpointCorrupt(
                f"conversation {cid!r}: stored shape (hidden={state.hidden_size}, "
                f"capacity={state.capacity}, {state.dtype}) does not match this store")
        self._counts.put(cid, meta.seq, len(deltas))
        return LoadedCheckpoint(
            conversation_id=cid, state=state, seq=meta.seq,
            outbox={int(k): v for k, v in _pairs(outbox_flat).items()},
            source=meta.source, n_deltas=len(deltas), updated_at_ms=meta.updated_at_ms,
        )

    async def inspect(self, cid: str) -> dict | None:
        """Operator view of one conversation (sizes, TTL, outbox, offsets); None if unknown."""
        k = self.keys(cid)
        with unavailable_as(f"inspect on {self._where}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(k.meta)
            pipe.strlen(k.base)
            pipe.lrange(k.deltas, 0, -1)
            pipe.hkeys(k.outbox)
            pipe.pttl(k.meta)
            raw_meta, base_len, deltas, outbox_keys, pttl = await pipe.execute()
        if not raw_meta:
            return None
        meta = CheckpointMeta.from_hash(raw_meta)
        sizes = [len(d) for d in deltas]
        info = CheckpointInfo(
            conversation_id=cid, keys=k._asdict(), seq=meta.seq, n_deltas=len(deltas),
            fingerprint=meta.fingerprint, fingerprint_matches=meta.fingerprint == self.fingerprint,
            writer=meta.writer, updated_at_ms=meta.updated_at_ms, source=meta.source,
            base_bytes=int(base_len), delta_bytes=sum(sizes), delta_sizes=sizes,
            outbox_seqs=sorted(int(s) for s in outbox_keys),
            ttl_s=pttl / 1000.0 if pttl >= 0 else None,
        )
        return info.model_dump(mode="json")

    # --- writes ------------------------------------------------------------------------------
    def _plan(self, c: TurnCommit) -> _Plan:
        st = c.state
        if (st.hidden_size, st.capacity, st.dtype) != (self.hidden_size, self.capacity, self.dtype):
            raise ValueError(
                f"{c.conversation_id}: state (hidden={st.hidden_size}, capacity={st.capacity}, "
                f"{st.dtype}) does not match this store")
        delta_bytes = [d.to_bytes() for d in c.deltas]
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
        known = self._counts.get(c.conversation_id, c.expected_seq)
        compact = known is None or known + len(delta_bytes) > self.compact_every
        payload = [st.to_bytes()] if compact else delta_bytes
        ttl_ms = 0 if self.ttl_s is None else max(1, round(self.ttl_s * 1000))
        src = c.source
        head: list[str | int] = [
            c.expected_seq, st.seq, self.fingerprint, self.writer_id, digest.hexdigest(),
            "c" if compact else "d", ttl_ms,
            src.topic if src else "", src.partition if src else 0, src.offset if src else 0,
            len(payload), len(c.outbox),
        ]
        args = [str(a).encode() for a in head] + payload
        for seq, event in sorted(c.outbox.items()):
            args += [str(int(seq)).encode(), bytes(event)]
        return _Plan(c.conversation_id, self.keys(c.conversation_id), args, compact)

    async def commit(self, commits: list[TurnCommit]) -> list[CommitResult]:
        """Write a batch: per conversation atomic CAS on seq, all in one round trip.

        Results are in input order. A conversation whose stored seq differs from its
        `expected_seq` is left untouched (status STALE, `stored_seq` tells where it is): the
        caller must drop its in-memory state and reload. Raises StoreUnavailable (nothing
        lost: retry the same batch after `wait_until_available`; commits that did land are
        reported ALREADY_APPLIED on the retry)."""
        if not commits:
            return []
        cids = [c.conversation_id for c in commits]
        if len(set(cids)) != len(cids):
            raise ValueError("one commit per conversation per batch (merge its turns' deltas)")
        plans = [self._plan(c) for c in commits]
        replies = await self._run_script(
            self._commit_script, [(p.keys, p.args) for p in plans], "commit")
        results = []
        for plan, reply in zip(plans, replies):
            code, stored_seq, n_deltas, compacted = (int(x) for x in reply)
            status = {_APPLIED: CommitStatus.APPLIED, _STALE: CommitStatus.STALE,
                      _FINGERPRINT: CommitStatus.FINGERPRINT,
                      _ALREADY_APPLIED: CommitStatus.ALREADY_APPLIED}[code]
            applied = status in (CommitStatus.APPLIED, CommitStatus.ALREADY_APPLIED)
            if applied:
                self._counts.put(plan.cid, stored_seq, n_deltas)
            else:
                self._counts.drop(plan.cid)
                log.info("checkpoint %s not applied (%s): stored seq %d", plan.cid,
                         status.value, stored_seq)
            results.append(CommitResult(
                conversation_id=plan.cid, applied=applied, stored_seq=stored_seq,
                compacted=bool(compacted), bytes_written=plan.nbytes, status=status,
                n_deltas=n_deltas,
            ))
        return results

    async def ack_emitted(self, emitted: dict[str, list[int]]) -> None:
        """Drop outbox events the broker confirmed (one round trip). Idempotent."""
        todo = {cid: seqs for cid, seqs in emitted.items() if seqs}
        if not todo:
            return
        with unavailable_as(f"ack_emitted on {self._where}"):
            pipe = self._redis.pipeline(transaction=False)
            for cid, seqs in todo.items():
                pipe.hdel(self.keys(cid).outbox, *(str(int(s)) for s in seqs))
            await pipe.execute()

    async def delete(self, cid: str) -> bool:
        """Remove every key of the conversation; True if anything existed."""
        self._counts.drop(cid)
        with unavailable_as(f"delete on {self._where}"):
            return bool(await self._redis.delete(*self.keys(cid)))

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

    async def prepare(self) -> None:
        """Load the scripts into the server's cache up front (so the first batch does not
        pay, and log, a NOSCRIPT round trip)."""
        with unavailable_as(f"SCRIPT LOAD on {self._where}"):
            for script in (self._commit_script, self._load_script):
                script.sha = await self._redis.script_load(script.script)

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> "CheckpointStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
