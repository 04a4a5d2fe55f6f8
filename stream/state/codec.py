"""Memory states to and from the bytes kept in Redis, checked on the way in.

The store keeps latents in `storage_dtype` (bfloat16 halves a float32 state, issue #14) while
the engine computes in `dtype`; conversion happens here, at the store boundary, so what is in
memory is exactly what is stored. A load checks that the bytes rebuild the conversation the
meta describes (identity, model fingerprint, base present, delta chain unbroken, seq, shape)
and raises instead of rebuilding a shorter or foreign memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from schemas.events import MemoryOrigin
from stream.identity import ConversationRef
from stream.state.errors import FingerprintMismatch, MemoryCorrupt
from stream.state.records import ORIGIN_BY_KIND, LoadedMemory, MarkerInfo, MemoryMeta
from workers.state import ConversationState, StateDelta, StateFormatError, rebuild, stored_dtype


def pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A flat HGETALL reply as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


@dataclass(frozen=True)
class Decoded:
    """A load reply made into a LoadedMemory, and whether the stored chain is in this codec's
    storage dtype (only then may the next commit append to it rather than rewrite it)."""

    loaded: LoadedMemory
    chain_reusable: bool


class StateCodec:
    def __init__(self, *, fingerprint: str, hidden_size: int, capacity: int, dtype: torch.dtype,
                 storage_dtype: torch.dtype | None = None) -> None:
        if not fingerprint:
            raise ValueError("fingerprint must be non-empty")
        self.fingerprint = fingerprint
        self.hidden_size = hidden_size
        self.capacity = capacity
        self.dtype = dtype
        # None when it equals the compute dtype (no conversion at all)
        self.storage_dtype = storage_dtype if storage_dtype not in (None, dtype) else None

    # --- to bytes ----------------------------------------------------------------------------
    def check_shape(self, ref: ConversationRef, st: ConversationState) -> None:
        if (st.hidden_size, st.capacity, st.dtype) != (self.hidden_size, self.capacity, self.dtype):
            raise ValueError(
                f"{ref}: state (hidden={st.hidden_size}, capacity={st.capacity}, "
                f"{st.dtype}) does not match this store")

    def state_bytes(self, st: ConversationState) -> bytes:
        if self.storage_dtype is None:
            return st.to_bytes()
        return ConversationState(
            hidden_size=st.hidden_size, capacity=st.capacity, dtype=self.storage_dtype,
            latents=st.latents.to(self.storage_dtype), snapshot_len=st.snapshot_len,
            segment_token_ids=st.segment_token_ids, seq=st.seq).to_bytes()

    def delta_bytes(self, d: StateDelta) -> bytes:
        if self.storage_dtype is None:
            return d.to_bytes()
        return StateDelta(seq=d.seq, new_segment=d.new_segment, token_ids=d.token_ids,
                          latents=d.latents.to(self.storage_dtype), prev_seq=d.prev_seq).to_bytes()

    def empty(self, seq: int) -> ConversationState:
        st = ConversationState(hidden_size=self.hidden_size, capacity=self.capacity, dtype=self.dtype,
                               storage_dtype=self.storage_dtype)
        st.seq = seq
        return st

    # --- from bytes --------------------------------------------------------------------------
    def decode(self, ref: ConversationRef, reply: list[Any]) -> Decoded:
        """A load.lua reply -> where the writer starts from. Raises MemoryCorrupt or
        FingerprintMismatch."""
        kind, gen, seq, meta_flat, base, deltas, outbox_flat, mark_flat = reply
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        gen, seq = int(gen), int(seq)
        marker = MarkerInfo.from_hash(pairs(mark_flat))
        held = (marker.held_seq, marker.held_reason or "checkpoint_corrupt") if marker and marker.held_seq is not None else None
        if kind == "corrupt":
            raise MemoryCorrupt(
                f"conversation {ref}: state keys without their meta (meta evicted or deleted by hand)")
        if kind == "cold":  # issue #14: moved to the cold tier; never mistake it for a new one
            raise MemoryCorrupt(
                f"conversation {ref}: its state was moved to the cold tier and could not be brought "
                f"back (no cold tier configured: EVOSTREAM_COLD_TIER_PATH, or its copy is gone)")
        if kind != "live":
            origin = ORIGIN_BY_KIND.get(kind, MemoryOrigin.NEW)
            return Decoded(LoadedMemory(
                ref=ref, state=self.empty(seq), seq=seq, gen=gen, origin=origin, outbox={}, source=None,
                n_deltas=0, gap_rejects=marker.gap_rejects if marker else 0,
                deleted_at=marker.deleted_at if marker and kind == "deleted" else None, held=held), chain_reusable=False)
        meta = MemoryMeta.from_hash(pairs(meta_flat))
        state, written_in = self._rebuild(ref, meta, base, deltas)
        return Decoded(LoadedMemory(
            ref=ref, state=state, seq=meta.seq, gen=meta.gen, origin=MemoryOrigin.CONTINUED,
            outbox={int(k): v for k, v in pairs(outbox_flat).items()},
            source=meta.source, n_deltas=len(deltas), updated_at_ms=meta.updated_at_ms,
            gap_rejects=marker.gap_rejects if marker else 0, gen_start=meta.gen_start, held=held,
        ), chain_reusable=written_in == (self.storage_dtype or self.dtype))

    def _rebuild(self, ref: ConversationRef, meta: MemoryMeta, base: bytes,
                 deltas: Sequence[bytes]) -> tuple[ConversationState, torch.dtype]:
        if meta.conversation_id is not None and (meta.conversation_id, meta.tenant) != (ref.conversation_id, ref.tenant):
            raise MemoryCorrupt(
                f"conversation {ref}: stored identity {meta.tenant!r}/{meta.conversation_id!r} differs")
        if meta.fingerprint != self.fingerprint:
            raise FingerprintMismatch(ref.conversation_id, meta.fingerprint, self.fingerprint)
        if meta.base_seq >= 0 and not base:
            raise MemoryCorrupt(f"conversation {ref}: base at seq {meta.base_seq} is missing (evicted?)")
        written_in = stored_dtype(base or (deltas[0] if deltas else b"")) or self.storage_dtype or self.dtype
        try:
            state = rebuild(base or None, list(deltas), hidden_size=self.hidden_size,
                            capacity=self.capacity, dtype=written_in)
        except StateFormatError as exc:
            raise MemoryCorrupt(f"conversation {ref}: {exc}") from exc
        if base and state.seq < meta.base_seq:
            raise MemoryCorrupt(f"conversation {ref}: base stands at seq {state.seq}, meta says {meta.base_seq}")
        if state.seq != meta.seq:
            raise MemoryCorrupt(
                f"conversation {ref}: rebuilt seq {state.seq} != stored seq {meta.seq} (deltas missing?)")
        widening = self.dtype == torch.float32 and state.dtype in (torch.bfloat16, torch.float16)  # exact
        if (state.hidden_size, state.capacity) == (self.hidden_size, self.capacity) and not (
                state.dtype in (self.dtype, self.storage_dtype) or widening):
            raise MemoryCorrupt(
                f"conversation {ref}: stored in {state.dtype}, this worker computes in {self.dtype} and may not "
                f"read it (that would round it; a worker joins such a store only with EVOSTREAM_STORE_DTYPE_JOIN=adopt)")
        if (state.hidden_size, state.capacity) != (self.hidden_size, self.capacity) or not (
                state.dtype in (self.dtype, self.storage_dtype) or widening):
            raise MemoryCorrupt(
                f"conversation {ref}: stored shape (hidden={state.hidden_size}, "
                f"capacity={state.capacity}, {state.dtype}) does not match this store")
        if state.dtype != self.dtype:  # stored in storage_dtype: compute in self.dtype (exact widening)
            state.latents, state.dtype = state.latents.to(self.dtype), self.dtype
        state.storage_dtype = self.storage_dtype
        return state, written_in
