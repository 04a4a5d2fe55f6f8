"""Who a conversation is: (tenant, conversation id), everywhere state is kept or looked up.

Why not the conversation id alone: two tenants of one deployment pick their ids
independently, so `"c1"` of tenant A and `"c1"` of tenant B are different conversations. The
pair is the identity of the Redis keys, the duplicate/seq checks, the state cache, the model
step, the emitted events and the queries. `tenant=None` is the default tenant (events that
carry no tenant); it is a tenant of its own, distinct from every named one.

Redis Cluster needs all keys of one conversation in one slot. A hash tag built from the raw
id would break for an id containing `}` (the tag ends at the first `}`), and would leak ids
into key names; the tag is therefore a fixed-length hash of the identity, and the readable
identity is stored inside the conversation's meta hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["ConversationRef", "RefLike", "as_ref"]

_TAG_BYTES = 16  # 128-bit: collisions are not a practical concern at any conversation count


@dataclass(frozen=True, order=True)
class ConversationRef:
    """A conversation's identity. Hashable and ordered, so it can key dicts and sort."""

    tenant: str | None
    conversation_id: str

    def __post_init__(self) -> None:
        if not self.conversation_id:
            raise ValueError("conversation_id must be non-empty")
        if self.tenant == "":
            raise ValueError("tenant must be None (the default tenant) or non-empty")

    @property
    def tag(self) -> str:
        """Hex digest of the identity: the Redis-Cluster hash tag of the conversation's keys,
        and the opaque key the model step and the caches use."""
        h = hashlib.blake2b(digest_size=_TAG_BYTES, person=b"evostream-conv")
        # A length-prefixed encoding, so that no two (tenant, id) pairs share bytes.
        t = b"" if self.tenant is None else self.tenant.encode("utf-8", "surrogatepass")
        h.update(b"\x01" if self.tenant is not None else b"\x00")
        h.update(len(t).to_bytes(4, "little"))
        h.update(t)
        h.update(self.conversation_id.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def __str__(self) -> str:
        return self.conversation_id if self.tenant is None else f"{self.tenant}/{self.conversation_id}"


RefLike = ConversationRef | str
"""What the store's methods accept: a ref, or a bare conversation id of the default tenant."""


def as_ref(value: RefLike) -> ConversationRef:
    return value if isinstance(value, ConversationRef) else ConversationRef(None, value)
