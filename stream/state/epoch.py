"""The store's identity (`<ns>:epoch`) and what a worker knows about it: telling "this
conversation is new" apart from "the store forgot it" (issue #17).

Why: a conversation whose keys are missing looks exactly like one never seen, so a Redis
emptied under the workers (FLUSHALL, a replica promoted empty, a lost volume) or restarted
from an old snapshot used to be papered over: the next turn of every conversation was embedded
on an empty (or an old) memory and labelled `memory: new`. Per conversation nothing can tell
the two apart; per store, two facts can:

* an *identity*: a small hash written once, when the namespace is created (by the first
  worker of a new deployment, by a rebuild, or by an operator's decision), never by an
  ordinary write. A store without it, or with another one, is not the store the workers wrote.
* *watermarks*, per input partition: "every record through this offset is reflected here",
  advanced by each batch in the same round trip as its commits (so with the same durability),
  before the batch is acknowledged. A store whose watermark is below what a worker (or the
  consumer group) acknowledged has lost acknowledged writes: it was restored from an old
  snapshot, or a failover lost them.

    <ns>:epoch  hash  id, created_at_ms, created_by, fp (model fingerprint), dtype (the
                      state storage dtype), status (ready | building), scope (all | tenant:T
                      | conversation:T/C), decision ("" | accept_loss | rebuilt), supersedes,
                      wm:<topic>:<partition> -> offset

A worker that finds its store lost stops acknowledging, says so once, and holds its batch
until an operator decides (README "When the store is wrong"): restore the data, rebuild it
(`evostream rebuild`), or accept the loss (`evostream store accept-loss`). Decisions are new
identities carrying `decision`; workers adopt them and drop what they cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from stream.state.availability import StoreUnavailable, unavailable_as
from stream.state.errors import UnsafeRedisConfig

log = logging.getLogger(__name__)

LUA_DIR = Path(__file__).resolve().parent / "lua"
Position = tuple[str, int]
"""(topic, partition) of an input record."""


@cache
def _lua(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


class StoreLost(StoreUnavailable):
    """The store is not the one this worker wrote to (emptied, replaced, restored from an old
    snapshot) or is being rebuilt. Like StoreUnavailable nothing is lost on our side if the
    caller holds its batch; unlike it, time alone does not cure it: an operator decides."""


class StoreMismatch(UnsafeRedisConfig):
    """The store was written by another model (fingerprint) or in another state precision,
    and this worker was not told to adopt it: it refuses to join (exit 78)."""


class Decision(str, Enum):
    NONE = ""
    ACCEPT_LOSS = "accept_loss"  # `evostream store accept-loss`: start over from empty memories
    REBUILT = "rebuilt"          # `evostream rebuild` wrote this namespace from the turns topic


class EpochInfo(BaseModel):
    """The identity hash, parsed."""

    id: str
    created_at_ms: int = 0
    created_by: str = ""
    fingerprint: str = ""
    dtype: str = ""
    status: str = "ready"
    scope: str = "all"
    decision: Decision = Decision.NONE
    supersedes: str = ""
    watermarks: dict[Position, int] = Field(default_factory=dict)

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> "EpochInfo | None":
        h = {k.decode(): v.decode() for k, v in raw.items()}
        if not h.get("id"):
            return None
        wm: dict[Position, int] = {}
        for k, v in h.items():
            if k.startswith("wm:"):
                topic, _, p = k[3:].rpartition(":")
                wm[(topic, int(p))] = int(v)
        return cls(id=h["id"], created_at_ms=int(h.get("created_at_ms", 0)), created_by=h.get("created_by", ""),
                   fingerprint=h.get("fp", ""), dtype=h.get("dtype", ""), status=h.get("status", "ready"),
                   scope=h.get("scope", "all"), decision=Decision(h.get("decision", "")),
                   supersedes=h.get("supersedes", ""), watermarks=wm)

    def to_hash(self) -> dict[str, str]:
        out = {"id": self.id, "created_at_ms": str(self.created_at_ms), "created_by": self.created_by,
               "fp": self.fingerprint, "dtype": self.dtype, "status": self.status, "scope": self.scope,
               "decision": self.decision.value, "supersedes": self.supersedes}
        out.update({wm_field(p): str(o) for p, o in self.watermarks.items()})
        return out


def wm_field(pos: Position) -> str:
    return f"wm:{pos[0]}:{pos[1]}"


def new_identity(*, fingerprint: str, dtype: str, created_by: str, **kw: Any) -> EpochInfo:
    return EpochInfo(id=uuid.uuid4().hex[:16], created_at_ms=int(time.time() * 1000), created_by=created_by,
                     fingerprint=fingerprint, dtype=dtype, **kw)


class StoreEpoch:
    """The identity hash in Redis: read, create or replace, advance watermarks."""

    def __init__(self, redis: Redis, namespace: str, where: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self.key = f"{namespace}:epoch"
        self.where = where
        self.advance_script = redis.register_script(_lua("epoch_advance"))
        self.create_script = redis.register_script(_lua("epoch_create"))

    async def read(self) -> EpochInfo | None:
        with unavailable_as(f"store identity on {self.where}"):
            return EpochInfo.from_hash(await self.redis.hgetall(self.key))

    async def write(self, info: EpochInfo, *, expect: str | None) -> tuple[bool, str]:
        """Write `info` if the identity now is `expect` ('' or None: none at all). Returns
        (written, the identity now)."""
        flat: list[str] = []
        for k, v in info.to_hash().items():
            flat += [k, v]
        with unavailable_as(f"store identity on {self.where}"):
            ok, cur = await self.create_script(keys=[self.key], args=["*" if not expect else expect, *flat])
        cur = cur.decode() if isinstance(cur, bytes) else str(cur)
        return bool(int(ok)), cur

    async def set_status(self, status: str) -> None:
        with unavailable_as(f"store identity on {self.where}"):
            await self.redis.hset(self.key, "status", status)

    def advance_call(self, known_id: str, through: Mapping[Position, int],
                     floors: Mapping[Position, int]) -> tuple[list[str], list[str]]:
        """(keys, args) of the watermark script, to ride in another pipeline. `floors`: what
        the writer acknowledged already; a store below them is behind (nothing is written)."""
        args = [known_id]
        for pos, off in sorted(through.items()):
            args += [wm_field(pos), str(int(off)), str(int(floors.get(pos, -1)))]
        return [self.key], args


class EpochWatch:
    """What this process knows about the store's identity, and the verdict.

    Inactive until `open` (library users, operator tools and tests that build a store by hand
    are not affected); a worker marks it `required` so that nothing is processed before it is
    opened. Listeners hear every change of verdict as (kind before, kind now, problem)."""

    def __init__(self, epoch: StoreEpoch, *, fingerprint: str, created_by: str) -> None:
        self.epoch = epoch
        self.fingerprint = fingerprint
        self.created_by = created_by
        self.required = False
        self.building_ok = False  # a rebuild writing into its own namespace: "building" is its own doing
        self.opened = False
        self.known: EpochInfo | None = None
        self.acked: dict[Position, int] = {}      # what this process acknowledged (after the store had it)
        self.committed: dict[Position, int] = {}  # the consumer group's offsets when opened (next to read)
        self.problem: str | None = None
        self.kind: str | None = None              # "lost" | "building" while there is a problem
        self.adoptions = 0                        # new identities adopted (caches must be dropped)
        self.listeners: list[Callable[[str | None, str | None, str | None], None]] = []  # (was, kind, problem)
        # raises StoreMismatch for an identity this worker must not join (another model or
        # precision); checked before any identity is adopted
        self.compat: Callable[[EpochInfo], None] | None = None
        self._opened = asyncio.Event()

    # --- verdicts ------------------------------------------------------------------------------
    def _set(self, kind: str | None, problem: str | None) -> None:
        if (kind, problem) == (self.kind, self.problem):
            return
        was = self.kind
        self.kind, self.problem = kind, problem
        if kind == "lost" and was != "lost":
            log.critical("memory-state store LOST (%s): %s. Holding the batch, acknowledging nothing, until an "
                         "operator decides: restore the data, `evostream rebuild`, or `evostream store accept-loss` "
                         "(README \"When the store is wrong\")", self.epoch.where, problem)
        elif kind == "building" and was != "building":
            log.warning("memory-state store %s: %s; holding until it is ready", self.epoch.where, problem)
        elif kind is None:
            log.warning("memory-state store %s trusted again (identity %s%s); resuming", self.epoch.where,
                        self.known.id if self.known else "?",
                        f", decision {self.known.decision.value}" if self.known and self.known.decision.value else "")
        for fn in self.listeners:
            fn(was, kind, problem)

    def judge(self, info: EpochInfo | None) -> tuple[str | None, str | None]:
        """(kind, problem) for what the store holds now; adopts a decided new identity."""
        known = self.known
        if info is None:
            if known is None:
                acked = {p: c for p, c in self.committed.items() if c > 0}
                return "lost", (f"namespace {self.epoch.namespace!r} has no store identity, but consumer group "
                                f"offsets show acknowledged records ({_describe(acked)}): the store was emptied")
            return "lost", (f"the store identity {known.id} is gone from {self.epoch.key!r}: the store was emptied "
                            f"(FLUSHALL, a replica promoted empty, a lost volume) after this worker wrote to it")
        if info.status != "ready" and not self.building_ok:
            return "building", f"a rebuild is writing into namespace {self.epoch.namespace!r} (status {info.status})"
        if known is not None and info.id != known.id:
            if info.decision is Decision.NONE:
                return "lost", (f"the store identity changed ({known.id} -> {info.id}) without an operator's "
                                f"decision: another store answers at this address")
        behind = self._behind(info)
        if behind:
            return "lost", behind
        if self.compat is not None and (known is None or info.id != known.id):
            self.compat(info)
        if known is not None and info.id != known.id:
            self.adoptions += 1
            self.acked.clear()  # acknowledged against the old identity: not this store's promise
        self.known = info
        return None, None

    def _behind(self, info: EpochInfo) -> str | None:
        adopting = self.known is None or info.id != self.known.id
        mine = {} if adopting else dict(self.acked)
        if adopting:
            # the consumer group's offsets are what was acknowledged; after an accepted loss
            # only partitions written since the decision carry a promise
            mine = {p: c - 1 for p, c in self.committed.items() if c > 0
                    and (info.decision is not Decision.ACCEPT_LOSS or p in info.watermarks)}
        late = {p: (info.watermarks.get(p, -1), o) for p, o in mine.items() if info.watermarks.get(p, -1) < o}
        if not late:
            return None
        shown = ", ".join(f"{t}[{p}] store through {w}, acknowledged through {o}" for (t, p), (w, o) in sorted(late.items())[:4])
        return (f"the store is behind what was acknowledged ({shown}): it was restored from an old snapshot, or "
                f"lost acknowledged writes")

    # --- use -----------------------------------------------------------------------------------
    async def open(self, committed: Mapping[Position, int] | None, *, create: Callable[[], EpochInfo]) -> EpochInfo | None:
        """At worker start: adopt the namespace's identity, create it for a new deployment (no
        identity and no acknowledged offsets), or record why the store cannot be trusted."""
        self.committed = {p: int(c) for p, c in (committed or {}).items() if c is not None}
        info = await self.epoch.read()
        if info is None and not any(c > 0 for c in self.committed.values()):
            written, _ = await self.epoch.write(create(), expect=None)
            info = await self.epoch.read()
            if written and info is not None:
                log.info("new store identity %s for namespace %r (%s, state dtype %s)", info.id,
                         self.epoch.namespace, info.fingerprint, info.dtype)
        kind, problem = self.judge(info)
        self.opened = True
        self._opened.set()
        self._set(kind, problem)
        return self.known

    async def wait_opened(self) -> None:
        await self._opened.wait()

    @property
    def active(self) -> bool:
        return self.opened

    async def check(self) -> bool:
        """Re-read the identity and judge it; True if the store can be trusted."""
        if not self.opened:
            return True
        kind, problem = self.judge(await self.epoch.read())
        self._set(kind, problem)
        return kind is None

    async def verify(self) -> None:
        """Raise StoreLost unless the store can be trusted now (one read)."""
        if self.opened and not await self.check():
            raise StoreLost(f"{self.epoch.where}: {self.problem}")

    def raise_if_lost(self) -> None:
        if self.opened and self.kind is not None:
            raise StoreLost(f"{self.epoch.where}: {self.problem}")

    def advance_call(self, through: Mapping[Position, int]) -> tuple[list[str], list[str]] | None:
        if not self.opened or self.known is None or not through:
            return None
        return self.epoch.advance_call(self.known.id, through, self.acked)

    def advanced(self, reply: Any) -> None:
        """The watermark script's answer: raise StoreLost when the identity is gone or another."""
        code = int(reply)
        if code == 1:
            return
        self._set("lost", {0: "the store identity is gone (the store was emptied)",
                           -1: "the store identity changed under this worker",
                           -2: "the store is behind what this worker acknowledged (restored from an old snapshot, or "
                               "it lost acknowledged writes)"}.get(code, f"watermark script answered {code}"))
        raise StoreLost(f"{self.epoch.where}: {self.problem}")

    def note_acked(self, through: Mapping[Position, int]) -> None:
        for pos, off in through.items():
            if off > self.acked.get(pos, -1):
                self.acked[pos] = off

    async def wait_for_decision(self, interval_s: float = 1.0) -> None:
        """Return once the store can be trusted again (re-read every `interval_s`; a store
        that does not answer meanwhile is waited out)."""
        while True:
            try:
                if await self.check():
                    return
            except StoreUnavailable:
                pass
            await asyncio.sleep(interval_s)


def _describe(offsets: Mapping[Position, int]) -> str:
    items = sorted(offsets.items())
    shown = ", ".join(f"{t}[{p}]@{o}" for (t, p), o in items[:4])
    return shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")
