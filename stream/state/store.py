"""The memory-state store: the durable latent memory of every conversation, in Redis.

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
`checkpoint_corrupt`, a wire name kept from before the rename) while every other conversation flows; `evostream reset` ends it.

Deletes are tombstones, not plain DELs. Each conversation has a small, long-lived *marker*
(generation, last seq, status) beside its state. A delete (or an operator reset) drops the
state keys and sets the marker's status; every writer's commit names the generation and seq
it started from, and the script compares them with the "view" computed from meta + marker.
A writer that computed a turn before the delete (a paused zombie) therefore can never bring
the conversation back. The marker outlives the state by `marker_ttl_s`, so a conversation
whose state expired is told apart from one with a seq gap, and its next embedding says
`memory: reset_after_expiry`.

Key layout: stream/state/keys.py. The scripts (stream/state/lua/) need Redis >= 7.2 or
Valkey (TIME followed by writes, multi-field HSET; the optional durability wait uses WAITAOF).
This module is the data path only; around it: codec.py (bytes <-> states, checked),
planner.py (append or compact, the retry digest), scripts.py (one round trip per batch),
durability.py, ttl.py, server.py (fit to run on?), inspect.py (the operator's view).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from schemas.events import DeadLetterReason
from stream.backoff import Backoff
from stream.identity import RefLike, as_ref
from stream.settings import Durability
from stream.state import scripts
from stream.state.availability import unavailable_as
from stream.state.codec import StateCodec
from stream.state.durability import DurabilityPolicy
from stream.state.epoch import EpochInfo, EpochWatch, Position, StoreEpoch, StoreMismatch, new_identity
from stream.state.errors import FingerprintMismatch, MemoryCorrupt, StaleDelete
from stream.state.inspect import inspect
from stream.state.keys import ConversationKeys, check_namespace, conversation_keys
from stream.state.planner import CommitPlanner, parse_ledger
from stream.state.records import CommitResult, CommitStatus, LoadedMemory, MemoryProblem, TurnCommit
from stream.state.redis_client import RedisOptions, describe_url, make_redis
from stream.state.server import ServerChecks
from stream.state.ttl import TtlPolicy

log = logging.getLogger(__name__)

_STATUS = {scripts.APPLIED: CommitStatus.APPLIED, scripts.STALE: CommitStatus.STALE,
           scripts.FINGERPRINT: CommitStatus.FINGERPRINT, scripts.ALREADY_APPLIED: CommitStatus.ALREADY_APPLIED,
           scripts.CORRUPT: CommitStatus.CORRUPT}


class MemoryStore:
    """Per-conversation memory states in Redis (see the module docstring for the semantics).

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
        self.namespace = check_namespace(namespace)
        self.ttl = TtlPolicy(ttl_s, marker_ttl_s, dict(ttl_by_tenant or {}))
        # storage_dtype (issue #14): latents kept in Redis in this dtype (bfloat16 halves a
        # float32 state); states handed out round each turn's latents to it, so what is in
        # memory is exactly what is stored.
        self.codec = StateCodec(fingerprint=fingerprint, hidden_size=hidden_size, capacity=capacity,
                                dtype=dtype, storage_dtype=storage_dtype)
        self.cold = cold  # stream.state.cold_tier.ColdTier: idle conversations moved out of Redis
        self.writer_id = writer_id or uuid.uuid4().hex[:16]  # shown by inspect: who wrote it
        self.planner = CommitPlanner(self.codec, self.ttl, writer_id=self.writer_id, compact_every=compact_every)
        self.where = describe_url(redis_url)  # no credentials
        # A short client-level retry absorbs one dropped connection; longer outages surface
        # as StoreUnavailable so the pipeline can pause instead of hanging inside redis-py.
        # make_redis (issue #8): standalone, rediss:// (TLS, ACL user), Sentinel or Cluster by
        # the URL scheme, through redis-py's own classes.
        self.redis: Redis = make_redis(
            redis_url, redis_options,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
        )
        durable = DurabilityPolicy(Durability(durability), durability_replicas, durability_timeout_ms, self.where)
        self.scripts = scripts.ScriptRunner(self.redis, durable, self.where)
        self.server = ServerChecks(self.redis, durable, self.where, backoff)
        # issue #17: the store's identity and watermarks (stream/state/epoch.py); inactive
        # until a worker (or a rebuild) opens it
        self.epoch = EpochWatch(StoreEpoch(self.redis, self.namespace, self.where), fingerprint=fingerprint,
                                created_by=self.writer_id)
        self.epoch.compat = self._join_check
        self.adopt_dtype = False

    @property
    def fingerprint(self) -> str:
        return self.codec.fingerprint

    def keys(self, ref: RefLike) -> ConversationKeys:
        return conversation_keys(self.namespace, ref)

    # --- reads -------------------------------------------------------------------------------
    async def load(self, ref: RefLike) -> LoadedMemory | None:
        """The conversation's live state, seq, pending outbox and source offset; None if it
        has no live state (unknown, deleted, expired, reset).

        Raises FingerprintMismatch (written under another model) or MemoryCorrupt
        (incomplete or inconsistent memory state)."""
        ref = as_ref(ref)
        got = (await self.load_many([ref]))[ref]
        if isinstance(got, MemoryProblem):
            if got.code is DeadLetterReason.FINGERPRINT_MISMATCH:
                raise FingerprintMismatch(ref.conversation_id, got.detail, self.fingerprint)
            raise MemoryCorrupt(got.detail)
        return got if got.live else None

    async def load_many(self, refs: list[RefLike]) -> dict[Any, LoadedMemory | MemoryProblem]:
        """Where each conversation stands (one round trip; each read atomic on its own),
        keyed by what the caller passed (refs, or bare ids of the default tenant).

        Never raises for one conversation's bad memory state: that conversation's entry is a
        MemoryProblem, and every other one loads."""
        given = list(dict.fromkeys(refs))
        unique = [as_ref(r) for r in given]
        if not unique:
            return {}
        self.epoch.raise_if_lost()
        replies = await self.scripts.run(self.scripts.load, [(self.keys(r), ()) for r in unique], "load")
        # What was read is only believed from a store that is still the one we wrote, and not
        # behind what was acknowledged (issue #17): "no memory" may be an emptied store, an
        # older memory a restored snapshot. Read after the loads, so a fault before them is
        # seen; one after them makes the commit's compare-and-set fail, and the re-read sees it.
        await self.epoch.verify()
        cold = [i for i, r in enumerate(replies) if r[0] in (b"cold", "cold")]
        if cold and self.cold is not None:  # issue #14: bring idle conversations back, exactly
            await self.cold.thaw(self, [unique[i] for i in cold])
            again = await self.scripts.run(self.scripts.load, [(self.keys(unique[i]), ()) for i in cold], "load")
            for i, r in zip(cold, again):
                replies[i] = r
        out: dict[Any, LoadedMemory | MemoryProblem] = {}
        counts = self.planner.counts
        for key, ref, reply in zip(given, unique, replies):
            try:
                decoded = self.codec.decode(ref, reply)
            except FingerprintMismatch as exc:
                counts.drop(ref)
                out[key] = MemoryProblem(ref, DeadLetterReason.FINGERPRINT_MISMATCH, exc.stored)
                continue
            except MemoryCorrupt as exc:
                counts.drop(ref)
                detail = str(exc)
                why = self.cold.why_missing(ref) if self.cold is not None and reply[0] in (b"cold", "cold") else None
                out[key] = MemoryProblem(  # issue #17: a quarantined cold-tier shard says which file and why
                    ref, DeadLetterReason.TENANT_MISMATCH if "identity" in detail else DeadLetterReason.CHECKPOINT_CORRUPT,
                    detail + (f": {why}" if why else ""))
                continue
            got = decoded.loaded
            if decoded.chain_reusable:
                counts.put(ref, got.seq, got.n_deltas)
            else:  # not live, or stored under the other dtype setting: the next commit compacts
                counts.drop(ref)
            out[key] = got
        return out

    async def inspect(self, ref: RefLike) -> dict | None:
        """Operator view of one conversation (stream/state/inspect.py)."""
        return await inspect(self, ref)

    # --- writes ------------------------------------------------------------------------------
    async def commit(self, commits: list[TurnCommit], through: dict[Position, int] | None = None) -> list[CommitResult]:
        """Write a batch: per conversation atomic CAS on (gen, seq), all in one round trip,
        followed by the configured durability wait.

        Results are in input order. A conversation whose view differs from the commit's
        expectation is left untouched (status STALE, `stored_seq` tells where it is): the
        caller must drop its in-memory state and reload. Raises StoreUnavailable (nothing
        lost: retry the same batch after `server.wait_until_available`; commits that did land
        are reported ALREADY_APPLIED on the retry). `through`: the batch's input positions,
        whose watermarks ride in the same round trip (stream/state/epoch.py); StoreLost if
        the store's identity is gone or another."""
        if not commits:
            return []
        self.epoch.raise_if_lost()
        refs = [c.ref for c in commits]
        if len(set(refs)) != len(refs):
            raise ValueError("one commit per conversation per batch (merge its turns' deltas)")
        plans = [self.planner.plan(c, self.keys(c.ref)) for c in commits]
        wm = self.epoch.advance_call(through or {})
        replies = await self.scripts.run(self.scripts.commit, [(p.keys.with_ledger(), p.args) for p in plans], "commit",
                                         durable=True, also=[(self.epoch.epoch.advance_script, *wm)] if wm else [])
        if wm:
            self.epoch.advanced(replies.pop())
        results = []
        for plan, reply in zip(plans, replies):
            code, stored_seq, n_deltas, compacted, gen = (int(x) for x in reply)
            status = _STATUS[code]
            applied = status in (CommitStatus.APPLIED, CommitStatus.ALREADY_APPLIED)
            if applied:
                self.planner.counts.put(plan.ref, stored_seq, n_deltas)
            else:
                self.planner.counts.drop(plan.ref)
                log.info("memory state %s not committed (%s): stored seq %d", plan.ref, status.value, stored_seq)
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
        with unavailable_as(f"ack_emitted on {self.where}"):
            pipe = self.redis.pipeline(transaction=False)
            for ref, seqs in todo.items():
                pipe.hdel(self.keys(ref).outbox, *(str(int(s)) for s in seqs))
            await pipe.execute()

    async def _end(self, ref: RefLike, status: str, at: tuple[int, int] | None = None) -> tuple[int, int]:
        ref = as_ref(ref)
        self.planner.counts.drop(ref)
        args = [status.encode(), str(self.ttl.marker_ms(ending=True)).encode(),
                (ref.tenant or "").encode(), ref.conversation_id.encode(),
                str(at[0]).encode() if at else b"", str(at[1] if at else 0).encode()]
        existed, last_seq, _gen = (await self.scripts.run(
            self.scripts.end, [(self.keys(ref).with_ledger(), args)], status, durable=True))[0]
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
        with unavailable_as(f"gap count on {self.where}"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(k.mark, "gap_rejects", 1)
            pipe.hset(k.mark, mapping={"tenant": ref.tenant or "", "cid": ref.conversation_id})
            ttl = self.ttl.marker_ms(ending=True)
            if ttl:
                pipe.pexpire(k.mark, ttl)
            n, *_ = await pipe.execute()
        return int(n)

    async def advance(self, through: dict[Position, int]) -> None:
        """Move the watermarks to `through` (a batch that committed nothing after its last
        write); with the durability wait, like a commit. StoreLost if the identity is gone."""
        wm = self.epoch.advance_call(through)
        if wm:
            (reply,) = await self.scripts.run(self.epoch.epoch.advance_script, [wm], "watermark", durable=True)
            self.epoch.advanced(reply)

    # --- identity (issue #17) ------------------------------------------------------------------
    def storage_dtype_name(self) -> str:
        return str(self.codec.storage_dtype or self.codec.dtype).removeprefix("torch.")

    async def open_identity(self, committed: dict[Position, int] | None, *, adopt_dtype: bool = False) -> EpochInfo | None:
        """Worker start: join this namespace's store, or create its identity for a new
        deployment (stream/state/epoch.py). StoreMismatch (exit 78) for a store of another
        model, or of another state precision unless `adopt_dtype`."""
        self.adopt_dtype = adopt_dtype
        return await self.epoch.open(committed, create=lambda: new_identity(
            fingerprint=self.fingerprint, dtype=self.storage_dtype_name(), created_by=self.writer_id))

    def _join_check(self, info: EpochInfo) -> None:
        """May this worker write to the store `info` describes? Adopts its state dtype when told."""
        ns = self.namespace
        if info.fingerprint and info.fingerprint != self.fingerprint:
            raise StoreMismatch(
                f"namespace {ns!r} holds memories of model fingerprint {info.fingerprint}, this worker runs "
                f"{self.fingerprint}: continuing them with another model would be silently wrong. A model change is "
                f"a blue-green rebuild: `evostream rebuild --into NEW` with the new model, then EVOSTREAM_REDIS_NAMESPACE=NEW")
        if info.scope != "all":
            raise StoreMismatch(f"namespace {ns!r} holds a partial rebuild ({info.scope}): workers cannot serve from it")
        mine = self.storage_dtype_name()
        if info.dtype and info.dtype != mine:
            if not self.adopt_dtype:
                raise StoreMismatch(
                    f"namespace {ns!r} stores states in {info.dtype}, this worker in {mine}: set "
                    f"EVOSTREAM_STORE_DTYPE_JOIN=adopt to read and write them in {info.dtype} (bfloat16 -> float32 is "
                    f"exact; float32 -> bfloat16 rounds every loaded state), or rebuild into a new namespace")
            stored = getattr(torch, info.dtype)
            self.codec.storage_dtype = None if stored == self.codec.dtype else stored
            log.warning("joining namespace %r in its state dtype %s (this worker computes in %s)", ns, info.dtype,
                        str(self.codec.dtype).removeprefix("torch."))

    async def ledger(self, ref: RefLike) -> dict[int, bytes]:
        """The applied turns of the conversation's live generation, seq -> digest of the
        messages the model read (stream/state/keys.py); {} when none are recorded."""
        with unavailable_as(f"ledger on {self.where}"):
            return parse_ledger(await self.redis.get(self.keys(ref).ledger))

    async def hold(self, ref: RefLike, seq: int, reason: str) -> int:
        """Record that turn `seq` was quarantined: every worker dead-letters the later turns
        behind it until it is applied (a replay after the repair) or the conversation is
        reset. Returns the seq held from now (the lowest)."""
        ref = as_ref(ref)
        args = [str(int(seq)).encode(), reason.encode(), (ref.tenant or "").encode(), ref.conversation_id.encode(),
                str(self.ttl.marker_ms(tenant=ref.tenant)).encode()]
        (held,) = await self.scripts.run(self.scripts.hold, [([self.keys(ref).mark], args)], "hold")
        return int(held)

    # --- lifetime ----------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Load the scripts into the server's cache up front (no NOSCRIPT round trip later)."""
        await self.scripts.load_all()
        with unavailable_as(f"SCRIPT LOAD on {self.where}"):
            for sc in (self.epoch.epoch.advance_script, self.epoch.epoch.create_script):
                sc.sha = await self.redis.script_load(sc.script)

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> "MemoryStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
