"""The operator's view of one conversation's memory state (`evostream inspect`): sizes, TTL,
outbox, source offset, whether it is whole (and if not, why), its marker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stream.identity import RefLike, as_ref
from stream.state.availability import unavailable_as
from stream.state.errors import MemoryCorrupt
from stream.state.records import MarkerInfo, MemoryInfo, MemoryMeta, MemoryProblem

if TYPE_CHECKING:  # the store imports nothing from here; a runtime import would be a cycle
    from stream.state.store import MemoryStore


async def inspect(store: "MemoryStore", ref: RefLike) -> dict | None:
    """JSON-able `MemoryInfo` of one conversation; None if nothing at all is stored for it."""
    ref = as_ref(ref)
    k = store.keys(ref)
    with unavailable_as(f"inspect on {store.where}"):
        pipe = store.redis.pipeline(transaction=True)
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
    got = (await store.load_many([ref]))[ref]
    if isinstance(got, MemoryProblem):
        problem = f"{got.code.value}: {got.detail}"
    meta = None
    if raw_meta:
        try:
            meta = MemoryMeta.from_hash(raw_meta)
        except MemoryCorrupt as exc:
            problem = problem or str(exc)
    sizes = [len(d) for d in deltas]
    info = MemoryInfo(
        conversation_id=ref.conversation_id, tenant=ref.tenant, keys=k._asdict(),
        whole=problem is None, problem=problem,
        seq=meta.seq if meta else None, gen=meta.gen if meta else None,
        base_seq=meta.base_seq if meta else None, n_deltas=len(deltas),
        fingerprint=meta.fingerprint if meta else None,
        fingerprint_matches=(meta.fingerprint == store.fingerprint) if meta else None,
        writer=meta.writer if meta else None, updated_at_ms=meta.updated_at_ms if meta else None,
        source=meta.source if meta else None,
        base_bytes=int(base_len), delta_bytes=sum(sizes), delta_sizes=sizes,
        outbox_seqs=sorted(int(s) for s in outbox_keys),
        ttl_s=pttl / 1000.0 if pttl >= 0 else None, marker=marker,
    )
    return info.model_dump(mode="json")
