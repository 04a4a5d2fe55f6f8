"""Compact, exact wire encoding of embedding vectors.

Why not a JSON list of numbers: a 1024-d float32 vector printed as decimal text is ~20 KB,
costs a float parse per value on every consumer, and only round-trips if every JSON library on
the path prints shortest-repr floats. Raw little-endian bytes in base64 are ~5.5 KB for f32
(~2.7 KB for f16), decode with one `frombuffer`, and are exact by construction.

Wire format (a JSON object, `extra` keys are an error)::

    {"dtype": "f32" | "f16", "dim": <int, 1..MAX_DIM>, "b64": "<base64>"}

* `b64` is standard base64 (RFC 4648 section 4: `+/` alphabet, `=` padding, no line breaks)
  of exactly `dim * itemsize` bytes: the vector's values in order, each an IEEE-754
  little-endian binary32 (`f32`, 4 bytes) or binary16 (`f16`, 2 bytes).
* Every value is finite. NaN/inf in an embedding is a bug upstream, and letting it onto the
  wire would poison every similarity computed against it downstream, so it is rejected at
  both ends.
* `f32` round-trips bit-exactly (including -0.0 and subnormals). `f16` keeps ~3 significant
  digits, enough for L2-normalised embeddings used in cosine search; a float32 value whose
  magnitude does not fit in binary16 (> 65504) is refused instead of becoming inf.
* Decoding always yields a native-endian float32 array, whatever the wire dtype, so consumers
  have a single type to handle.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

VectorDType = Literal["f32", "f16"]

MAX_DIM = 65536
"""Upper bound on `dim`; far above any embedding size, low enough to bound a message."""

_WIRE_DTYPES: dict[str, np.dtype] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}


class EncodedVector(BaseModel):
    """One vector on the wire. Validation checks the byte length and finiteness, so an
    instance that exists (built through validation) always decodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: VectorDType
    dim: int = Field(ge=1, le=MAX_DIM)
    b64: str

    @model_validator(mode="after")
    def _payload_matches_header(self) -> "EncodedVector":
        _payload_array(self.dtype, self.dim, self.b64)
        return self


def _payload_array(dtype: str, dim: int, b64: str) -> np.ndarray:
    """Decode and check the payload; raises ValueError on any inconsistency.

    Shared by the model validator and `decode_vector` because an `EncodedVector` can also be
    built with `model_construct` (no validation), and decoding must stay safe then too.
    """
    wire = _WIRE_DTYPES.get(dtype)
    if wire is None:
        raise ValueError(f"unknown vector dtype {dtype!r}; expected one of {sorted(_WIRE_DTYPES)}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise ValueError(f"vector dim must be an int in 1..{MAX_DIM}, got {dim!r}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"vector b64 is not valid base64: {exc}") from None
    expected = dim * wire.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"vector payload is {len(raw)} bytes but dtype {dtype} x dim {dim} needs {expected}"
        )
    values = np.frombuffer(raw, dtype=wire)
    if not np.isfinite(values).all():
        raise ValueError("vector contains NaN or infinite values")
    return values


def encode_vector(vector: np.ndarray, dtype: VectorDType = "f32") -> EncodedVector:
    """Encode a 1-D vector. Inputs of another float dtype are cast to the wire dtype (for
    `f32` input with `dtype="f32"` this is the identity, hence bit-exact)."""
    wire = _WIRE_DTYPES.get(dtype)
    if wire is None:
        raise ValueError(f"unknown vector dtype {dtype!r}; expected one of {sorted(_WIRE_DTYPES)}")
    array = np.asarray(vector)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {array.shape}")
    if array.dtype.kind != "f":
        raise ValueError(f"expected a floating-point vector, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("cannot encode a vector containing NaN or infinite values")
    with np.errstate(over="ignore"):
        cast = array.astype(wire)
    if not np.isfinite(cast).all():
        raise ValueError(f"vector values overflow {dtype} (|x| too large for the wire dtype)")
    return EncodedVector(
        dtype=dtype, dim=int(array.shape[0]), b64=base64.b64encode(cast.tobytes()).decode("ascii")
    )


def decode_vector(encoded: EncodedVector) -> np.ndarray:
    """Decode to a fresh, writable, native-endian float32 array of shape (dim,)."""
    values = _payload_array(encoded.dtype, encoded.dim, encoded.b64)
    return values.astype(np.float32)
