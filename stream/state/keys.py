"""Where a conversation's memory state lives in Redis: five keys sharing one hash tag.

All keys of one conversation share the Redis-Cluster hash tag `{<tag>}`, where `tag` is a
fixed-length hash of (tenant, conversation id) (`stream.identity`), so the scripts' keys live in
one slot whatever characters an id contains, and two tenants' conversations with one id never
share state:

    <ns>:{<tag>}:meta    hash   seq, gen, base_seq, n_deltas, fp (model fingerprint), writer,
                                digest, updated_at_ms, tenant, cid, src_topic, src_partition,
                                src_offset, gsp/gso (where the generation began)
    <ns>:{<tag>}:base    string ConversationState.to_bytes() at the last compaction (absent
                                until the first compaction)
    <ns>:{<tag>}:deltas  list   StateDelta.to_bytes(), one per turn since the base
    <ns>:{<tag>}:outbox  hash   seq -> encoded embedding event (until acked)
    <ns>:{<tag>}:mark    hash   gen, seq, status (live | deleted | reset | cold), tenant, cid,
                                at_ms, gap_rejects, del_p/del_o, held_seq/held_reason (a turn
                                quarantined: later ones wait behind it); TTL = state TTL + marker_ttl_s
    <ns>:{<tag>}:ledger  string the generation's applied turns, 16 bytes each: seq (int64 LE) and
                                8 bytes of BLAKE2b over the messages the model read (tells a late
                                turn and a corrected resend from a plain duplicate, issue #17)
"""

from __future__ import annotations

from typing import NamedTuple

from stream.identity import RefLike, as_ref


class ConversationKeys(NamedTuple):
    meta: str
    base: str
    deltas: str
    outbox: str
    mark: str

    @property
    def ledger(self) -> str:
        """Sixth key, derived (not a field: callers that build or unpack the five keys of the
        state keep working); the scripts that need it get it as KEYS[6]."""
        return self.meta[: -len("meta")] + "ledger"

    def with_ledger(self) -> list[str]:
        return [*self, self.ledger]


def conversation_keys(namespace: str, ref: RefLike) -> ConversationKeys:
    """The five keys of a conversation; `{tag}` is the Redis-Cluster hash tag (one slot)."""
    ref = as_ref(ref)
    prefix = f"{namespace}:{{{ref.tag}}}:"
    return ConversationKeys(prefix + "meta", prefix + "base", prefix + "deltas", prefix + "outbox",
                            prefix + "mark")


def check_namespace(namespace: str) -> str:
    """A namespace is a key prefix outside every hash tag: it must not contain braces."""
    if not namespace or "{" in namespace or "}" in namespace:
        raise ValueError(f"namespace must be non-empty and brace-free, got {namespace!r}")
    return namespace
