"""How one conversation's commit becomes the arguments of commit.lua.

Two decisions are made here, before anything is sent: append the turns' small deltas or
compact (write the full state as the new base), and the digest that lets this writer, and only
this writer, recognise its own commit when a retry follows a lost reply.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from stream.identity import ConversationRef
from stream.state.codec import StateCodec
from stream.state.keys import ConversationKeys
from stream.state.records import TurnCommit
from stream.state.ttl import TtlPolicy
from workers.state import NO_SEQ


LEDGER_RECORD = 16
"""Bytes per applied turn in a conversation's ledger: seq (int64 LE) + 8-byte digest."""


def ledger_records(ledger: dict[int, bytes]) -> bytes:
    return b"".join(int(seq).to_bytes(8, "little", signed=True) + bytes(d)[:8].ljust(8, b"\0")
                    for seq, d in sorted(ledger.items()))


def parse_ledger(raw: bytes | None) -> dict[int, bytes]:
    """A ledger string as {seq: digest}; a torn tail (never written by the scripts) is ignored."""
    raw = raw or b""
    out: dict[int, bytes] = {}
    for i in range(0, len(raw) - LEDGER_RECORD + 1, LEDGER_RECORD):
        out[int.from_bytes(raw[i:i + 8], "little", signed=True)] = bytes(raw[i + 8:i + LEDGER_RECORD])
    return out


class DeltaCounts:
    """Bounded memory of "conversation c at seq s has n deltas since its base".

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
class CommitPlan:
    ref: ConversationRef
    keys: ConversationKeys
    args: list[bytes]
    compact: bool

    @property
    def nbytes(self) -> int:
        return sum(len(k.encode()) for k in self.keys) + sum(len(a) for a in self.args)


class CommitPlanner:
    def __init__(self, codec: StateCodec, ttl: TtlPolicy, *, writer_id: str, compact_every: int) -> None:
        if compact_every < 0:
            raise ValueError("compact_every must be >= 0")
        self.codec = codec
        self.ttl = ttl
        self.writer_id = writer_id
        self.compact_every = compact_every
        self.counts = DeltaCounts()
        # Keys the commit digest, so that only THIS instance's retry is recognised as "already
        # applied" (writer ids are configurable and need not be unique).
        self._digest_key = uuid.uuid4().bytes

    def plan(self, c: TurnCommit, keys: ConversationKeys) -> CommitPlan:
        st = c.state
        self.codec.check_shape(c.ref, st)
        delta_bytes = [self.codec.delta_bytes(d) for d in c.deltas]
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
        known = 0 if c.expected_seq == NO_SEQ else None if c.fresh else self.counts.get(c.ref, c.expected_seq)
        compact = known is None or known + len(delta_bytes) > self.compact_every
        payload = [self.codec.state_bytes(st)] if compact else delta_bytes
        src = c.source
        head: list[str | int] = [
            c.expected_gen, c.expected_seq, st.seq, self.codec.fingerprint, self.writer_id, digest.hexdigest(),
            "c" if compact else "d", self.ttl.state_ms(c.ref.tenant),
            src.topic if src else "", src.partition if src else 0, src.offset if src else 0,
            len(payload), len(c.outbox), self.ttl.marker_ms(tenant=c.ref.tenant), c.ref.tenant or "",
            c.ref.conversation_id,
            c.gen_start[0] if c.gen_start else "", c.gen_start[1] if c.gen_start else 0,
        ]
        args = [str(a).encode() for a in head] + payload
        for seq, event in sorted(c.outbox.items()):
            args += [str(int(seq)).encode(), bytes(event)]
        args += [ledger_records(c.ledger), str(c.deltas[0].seq).encode()]
        return CommitPlan(c.ref, keys, args, compact)
