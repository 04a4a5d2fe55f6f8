"""Per-conversation memory state, its compact byte form, and per-turn deltas.

Why this shape: the reference groups turns into *segments*; every turn of a segment is read
against the queue as it stood when the segment opened. So besides the live queue we must
keep that snapshot and the token ids of the segment's turns. Both fit in one buffer:

    latents = snapshot ++ latents appended by the open segment's turns

`snapshot = latents[:snapshot_len]` and `queue = latents[-capacity:]`. When the next segment
opens, the buffer is cut to the live queue and that becomes the new snapshot. The buffer never
holds more than `capacity + max_segment_turns * num_latents` rows, so a turn costs the same
whatever the length of the conversation.

A turn changes the state by: (maybe) opening a segment, appending its token ids, appending its
`num_latents` latents, and setting `seq`. That is exactly a `StateDelta`, which is what the
checkpoint store appends instead of rewriting the whole state.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

NO_SEQ = -1
"""`seq` of a conversation to which no turn has been applied yet."""

_STATE_MAGIC = b"EVS1"
_DELTA_MAGIC_V1 = b"EVD1"  # read only: deltas written before continuity was recorded
_DELTA_MAGIC = b"EVD2"
_DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_BYTES_PER = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

# magic, dtype code, hidden, capacity, seq, snapshot_len, n_latents, n_segment_turns
_STATE_HEADER = struct.Struct("<4sBIIqIII")
# magic, dtype code, hidden, seq, new_segment, n_tokens, n_latents
_DELTA_HEADER_V1 = struct.Struct("<4sBIqBII")
# magic, dtype code, hidden, seq, prev_seq, new_segment, n_tokens, n_latents
_DELTA_HEADER = struct.Struct("<4sBIqqBII")


class StateFormatError(ValueError):
    """Bytes that do not decode to a state or delta (corrupt, truncated, wrong model)."""


def _tensor_to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _tensor_from_bytes(buf: bytes | memoryview, dtype: torch.dtype, rows: int, hidden: int) -> torch.Tensor:
    if rows == 0:
        return torch.empty((0, hidden), dtype=dtype)
    if dtype == torch.bfloat16:
        arr = np.frombuffer(buf, dtype=np.int16, count=rows * hidden).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(rows, hidden)
    np_dtype = np.float32 if dtype == torch.float32 else np.float16
    arr = np.frombuffer(buf, dtype=np_dtype, count=rows * hidden).copy()
    return torch.from_numpy(arr).reshape(rows, hidden)


def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError as exc:
        raise StateFormatError(f"unsupported latent dtype {dtype}") from exc


def _code_dtype(code: int) -> torch.dtype:
    try:
        return _CODE_DTYPES[code]
    except KeyError as exc:
        raise StateFormatError(f"unknown dtype code {code}") from exc


@dataclass
class StateDelta:
    """What one turn changed. Applying deltas in order to the state they started from
    rebuilds the same state as the full serialisation (bit for bit).

    `prev_seq` is the seq of the state the delta was computed on (set by `apply` when it is
    first applied). It makes a stored chain self-checking: a delta whose `prev_seq` is not the
    seq of the state it is applied to means a piece of the chain (a base, earlier deltas) is
    missing, and applying it would silently continue a truncated memory."""

    seq: int
    new_segment: bool
    token_ids: list[int]
    latents: torch.Tensor  # (num_latents, hidden), on CPU
    prev_seq: int | None = None  # None: unknown (a delta of format v1, or not yet applied)

    def to_bytes(self) -> bytes:
        lat = self.latents
        if self.prev_seq is None:
            raise StateFormatError(f"delta for seq {self.seq} has no prev_seq (apply it before storing)")
        header = _DELTA_HEADER.pack(
            _DELTA_MAGIC, _dtype_code(lat.dtype), lat.shape[1], self.seq, self.prev_seq,
            1 if self.new_segment else 0, len(self.token_ids), lat.shape[0],
        )
        tokens = np.asarray(self.token_ids, dtype=np.int32).tobytes()
        return header + tokens + _tensor_to_bytes(lat)

    @classmethod
    def from_bytes(cls, data: bytes) -> "StateDelta":
        if data[:4] == _DELTA_MAGIC and len(data) >= _DELTA_HEADER.size:
            _, code, hidden, seq, prev, new_seg, n_tok, n_lat = _DELTA_HEADER.unpack_from(data, 0)
            off = _DELTA_HEADER.size
        elif data[:4] == _DELTA_MAGIC_V1 and len(data) >= _DELTA_HEADER_V1.size:
            _, code, hidden, seq, new_seg, n_tok, n_lat = _DELTA_HEADER_V1.unpack_from(data, 0)
            prev, off = None, _DELTA_HEADER_V1.size
        else:
            raise StateFormatError("not an evostream state delta (bad magic or truncated)")
        dtype = _code_dtype(code)
        need = off + 4 * n_tok + n_lat * hidden * _BYTES_PER[dtype]
        if len(data) != need:
            raise StateFormatError(f"state delta has {len(data)} bytes, header says {need}")
        tokens = np.frombuffer(data, dtype=np.int32, count=n_tok, offset=off).tolist()
        off += 4 * n_tok
        lat = _tensor_from_bytes(memoryview(data)[off:], dtype, n_lat, hidden)
        return cls(seq=seq, new_segment=bool(new_seg), token_ids=tokens, latents=lat, prev_seq=prev)


@dataclass
class ConversationState:
    """The latent memory of one conversation (see module docstring for the layout)."""

    hidden_size: int
    capacity: int
    dtype: torch.dtype = torch.float32
    latents: torch.Tensor = field(default=None)  # type: ignore[assignment]
    snapshot_len: int = 0
    segment_token_ids: list[list[int]] = field(default_factory=list)
    seq: int = NO_SEQ
    # Issue #14: latents are stored in this dtype (e.g. bfloat16) while the model computes in
    # `dtype`. Each turn's latents are rounded to it as they are applied, so the state in
    # memory is exactly what the store keeps, and a reload, a replay or another batching gives
    # the same numbers as an uninterrupted run. None: no rounding.
    storage_dtype: torch.dtype | None = None
    # queue_digest's memo: (latents tensor, its in-place version counter, {k: digest}); holding the
    # tensor keeps its identity from being reused, the version catches in-place writes
    _digests: tuple[torch.Tensor, int, dict[int, str]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.latents is None:
            self.latents = torch.empty((0, self.hidden_size), dtype=self.dtype)

    # --- views -------------------------------------------------------------------------
    @property
    def queue(self) -> torch.Tensor:
        """The live latent memory queue: the last `capacity` latents."""
        return self.latents[-self.capacity:] if self.latents.shape[0] else self.latents

    @property
    def snapshot(self) -> torch.Tensor:
        """The queue as it was when the open segment started."""
        return self.latents[: self.snapshot_len]

    @property
    def memory_len(self) -> int:
        return min(self.latents.shape[0], self.capacity)

    def queue_digest(self, k: int) -> str:
        """Digest of the first `k` latents of the queue: their dtype, shape and bytes.

        What the retriever computes over a queue prefix depends on exactly these bytes (and the
        model), so the query-ready memory (workers/query_cache.py) is addressed by this digest:
        a state that moved on, was reset, replayed or reloaded either has the same bytes (and
        the cached work is valid for it) or does not match. Memoised per latents buffer: every
        turn replaces the buffer, an in-place write bumps the tensor's version."""
        lat = self.latents
        memo = self._digests
        if memo is None or memo[0] is not lat or memo[1] != lat._version:
            memo = (lat, lat._version, {})
            self._digests = memo
        got = memo[2].get(k)
        if got is None:
            q = self.queue[:k].detach().to("cpu").contiguous()
            h = hashlib.blake2b(digest_size=16, person=b"evostream-queue")
            h.update(f"{q.dtype}|{tuple(q.shape)}|".encode())
            raw = q.view(torch.int16) if q.dtype == torch.bfloat16 else q
            if q.numel():
                h.update(memoryview(raw.numpy()).cast("B"))
            got = memo[2][k] = h.hexdigest()
        return got

    @property
    def segment_tokens(self) -> int:
        return sum(len(t) for t in self.segment_token_ids)

    def nbytes(self) -> int:
        """Approximate resident size, for the byte-bounded state cache."""
        return (
            self.latents.numel() * self.latents.element_size()
            + 4 * self.segment_tokens
            + 256
        )

    # --- mutation ----------------------------------------------------------------------
    def apply(self, delta: StateDelta) -> None:
        """Advance by one turn. Used both live (engine) and when replaying stored deltas,
        so both paths are the same code."""
        if delta.latents.shape[1] != self.hidden_size:
            raise StateFormatError(
                f"delta hidden size {delta.latents.shape[1]} != state hidden size {self.hidden_size}"
            )
        if delta.latents.dtype != self.dtype:
            raise StateFormatError(f"delta dtype {delta.latents.dtype} != state dtype {self.dtype}")
        if delta.prev_seq is None:
            delta.prev_seq = self.seq  # live: the delta was computed on this state
        elif delta.prev_seq != self.seq:
            raise StateFormatError(
                f"delta for seq {delta.seq} continues seq {delta.prev_seq}, but the state is at "
                f"seq {self.seq}: part of the stored chain is missing")
        if delta.seq <= self.seq:
            raise StateFormatError(f"delta for seq {delta.seq} does not advance the state at seq {self.seq}")
        if self.storage_dtype is not None and self.storage_dtype != self.dtype:
            delta.latents = delta.latents.to(self.storage_dtype).to(self.dtype)  # issue #14
        if delta.new_segment:
            self.latents = self.queue.clone()
            self.snapshot_len = self.latents.shape[0]
            self.segment_token_ids = []
        self.segment_token_ids.append(list(delta.token_ids))
        self.latents = torch.cat([self.latents, delta.latents.to("cpu")], dim=0)
        self.seq = delta.seq

    def copy(self) -> "ConversationState":
        return ConversationState(
            hidden_size=self.hidden_size,
            capacity=self.capacity,
            dtype=self.dtype,
            latents=self.latents.clone(),
            snapshot_len=self.snapshot_len,
            segment_token_ids=[list(t) for t in self.segment_token_ids],
            seq=self.seq,
            storage_dtype=self.storage_dtype,
        )

    def equals(self, other: "ConversationState", atol: float = 0.0) -> bool:
        if (
            self.seq != other.seq
            or self.snapshot_len != other.snapshot_len
            or self.segment_token_ids != other.segment_token_ids
            or self.latents.shape != other.latents.shape
            or self.dtype != other.dtype
        ):
            return False
        if atol == 0.0:
            return bool(torch.equal(self.latents, other.latents))
        return bool(torch.allclose(self.latents.float(), other.latents.float(), atol=atol, rtol=0))

    # --- bytes -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = _STATE_HEADER.pack(
            _STATE_MAGIC, _dtype_code(self.dtype), self.hidden_size, self.capacity, self.seq,
            self.snapshot_len, self.latents.shape[0], len(self.segment_token_ids),
        )
        lens = np.asarray([len(t) for t in self.segment_token_ids], dtype=np.int32).tobytes()
        flat = [tok for turn in self.segment_token_ids for tok in turn]
        tokens = np.asarray(flat, dtype=np.int32).tobytes()
        return header + lens + tokens + _tensor_to_bytes(self.latents)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ConversationState":
        if len(data) < _STATE_HEADER.size or data[:4] != _STATE_MAGIC:
            raise StateFormatError("not an evostream conversation state (bad magic or truncated)")
        _, code, hidden, capacity, seq, snap, n_lat, n_turns = _STATE_HEADER.unpack_from(data, 0)
        dtype = _code_dtype(code)
        off = _STATE_HEADER.size
        if len(data) < off + 4 * n_turns:
            raise StateFormatError("conversation state truncated in segment table")
        lens = np.frombuffer(data, dtype=np.int32, count=n_turns, offset=off).tolist()
        off += 4 * n_turns
        n_tok = int(sum(lens))
        need = off + 4 * n_tok + n_lat * hidden * _BYTES_PER[dtype]
        if len(data) != need:
            raise StateFormatError(f"conversation state has {len(data)} bytes, header says {need}")
        flat = np.frombuffer(data, dtype=np.int32, count=n_tok, offset=off).tolist()
        off += 4 * n_tok
        segs: list[list[int]] = []
        pos = 0
        for n in lens:
            segs.append(flat[pos : pos + n])
            pos += n
        lat = _tensor_from_bytes(memoryview(data)[off:], dtype, n_lat, hidden)
        if snap > n_lat:
            raise StateFormatError(f"snapshot_len {snap} exceeds stored latents {n_lat}")
        return cls(
            hidden_size=hidden, capacity=capacity, dtype=dtype, latents=lat,
            snapshot_len=snap, segment_token_ids=segs, seq=seq,
        )


def stored_dtype(raw: bytes) -> torch.dtype | None:
    """Latent dtype a serialized state or delta was written in (byte 4 of either header), or
    None for bytes too short or a code this version does not know; lets a store whose storage
    dtype setting changed still read what is there."""
    return _CODE_DTYPES.get(raw[4]) if len(raw) > 4 else None


def rebuild(base: bytes | None, deltas: list[bytes], *, hidden_size: int, capacity: int,
            dtype: torch.dtype) -> ConversationState:
    """State from a stored base plus the deltas appended after it (the store's layout).

    Raises StateFormatError when the chain does not connect (a delta continues a seq the
    state is not at): a missing base or missing deltas must never rebuild a shorter memory."""
    state = (
        ConversationState.from_bytes(base)
        if base
        else ConversationState(hidden_size=hidden_size, capacity=capacity, dtype=dtype)
    )
    for raw in deltas:
        delta = StateDelta.from_bytes(raw)
        if delta.seq <= state.seq:
            continue  # a delta already folded into the base by a compaction
        state.apply(delta)
    return state
