"""One index interface, two backends: PostgreSQL + pgvector (stream/index/pgvector.py, what
users run and the embedded default) and SQLite + numpy (stream/index/sqlite.py, no server at
all: the fallback when no DSN is configured).

Why one interface: the rules of the sink (stream/index/ops.py: generations, tombstones,
tenants, rejects) and its exactly-once bookkeeping (rows and consumed offsets in one
transaction) are written once, in `VectorIndex.apply`; a backend only provides a transaction,
the generations a conversation holds, and the statements of a `Plan`. The same conformance
tests run against both (tests/test_sink_index.py).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterator, Sequence

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from stream.index.ops import BatchStats, ConvKey, Op, Plan, Reject, TurnRow, Upsert, conversations_of, plan

Record = tuple[str, int, int, Op | str]   # (topic, partition, offset, parsed op or ignore reason)


class IndexHit(BaseModel):
    """One search result: a turn of a conversation, its cosine similarity to the query."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conversation_id: str
    generation: int
    seq: int
    document_id: str
    score: float = Field(allow_inf_nan=False)
    turn_at: AwareDatetime
    text: str | None = None


class SearchQuery(BaseModel):
    """What to rank and where. Every search is scoped to ONE tenant (None = the default
    tenant); `conversation_id` narrows it to one conversation (an exact scan of its rows),
    otherwise the tenant's rows are ranked through the HNSW index (`exact` forces a scan).
    Only rows of `checkpoint` are compared: vectors of another model are not comparable."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    vector: np.ndarray
    checkpoint: str
    tenant: str | None = None
    conversation_id: str | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    k: int = Field(5, ge=1, le=1000)
    exact: bool = False


class IndexError_(RuntimeError):
    """The index cannot do what was asked (unreachable, misconfigured); the message says why."""


class VectorIndex(abc.ABC):
    """A table of turn vectors fed by the sink; see the module doc."""

    kind: str = "?"

    # -- backend primitives ------------------------------------------------------------------
    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Everything inside commits together or not at all."""

    @abc.abstractmethod
    def stored_generations(self, convs: set[ConvKey]) -> dict[ConvKey, set[int]]:
        """The generations each conversation has rows of (inside the current transaction)."""

    @abc.abstractmethod
    def execute(self, sink: str, plan: Plan) -> None:
        """Run the plan's statements (inside the current transaction)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """The vector dimension of the table; None before the first row fixed it."""

    @abc.abstractmethod
    def offsets(self, sink: str) -> dict[tuple[str, int], int]:
        """{(topic, partition): next offset to read} as committed with the rows."""

    @abc.abstractmethod
    def search(self, q: SearchQuery) -> list[IndexHit]:
        """The `q.k` best turns, best first (equal scores: conversation, then seq order)."""

    @abc.abstractmethod
    def rows(self, tenant: str | None = None) -> list[TurnRow]:
        """Every row (of one tenant when given), for checks and exports."""

    @abc.abstractmethod
    def count(self) -> int: ...

    @abc.abstractmethod
    def text(self, tenant: str | None, conversation_id: str, seq: int) -> str | None: ...

    @abc.abstractmethod
    def acquire_writer(self, sink: str) -> bool:
        """Take the writer lock of `sink` (one active sink per name); False when another holds it."""

    @abc.abstractmethod
    def forget(self, sink: str) -> None:
        """Drop the sink's offsets and every row and text: the next run rebuilds from offset 0."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the index lives, for messages (never a password)."""

    # -- the one implementation of applying a batch -----------------------------------------
    def apply(self, sink: str, records: Sequence[Record]) -> BatchStats:
        """Apply one batch and store the offsets it reaches, in ONE transaction."""
        with self.transaction():
            checked = list(self._check_dims(records))
            p = plan(checked, self.stored_generations(conversations_of(op for *_, op in checked
                                                                       if not isinstance(op, str))))
            self.execute(sink, p)
        return p.stats

    def _check_dims(self, records: Sequence[Record]) -> Iterator[Record]:
        dim = self.dim
        for topic, partition, offset, op in records:
            if isinstance(op, Upsert):
                d = int(op.row.vector.shape[0])
                if dim is None:
                    dim = d
                elif d != dim:
                    op = Reject(topic, partition, offset, "dim_mismatch",
                                f"vector of dim {d}; the index holds dim {dim}", op.row.conversation_id.encode(), None)
            yield topic, partition, offset, op

    def __enter__(self) -> "VectorIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cosine_rank(rows: list[tuple[np.ndarray, tuple]], query: np.ndarray, k: int) -> list[tuple[float, tuple]]:
    """Exact cosine ranking (the SQLite backend, and the reference the benchmark's recall is
    measured against): [(score, payload)] best first; ties by payload order."""
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    qn = float(np.linalg.norm(q))
    if not rows:
        return []
    mat = np.stack([r[0] for r in rows]).astype(np.float32)
    norms = np.linalg.norm(mat, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where((norms > 0) & (qn > 0), (mat @ q) / (norms * qn if qn > 0 else 1.0), 0.0)
    order = sorted(range(len(rows)), key=lambda i: (-float(scores[i]), rows[i][1]))[:k]
    return [(float(np.clip(scores[i], -1.0, 1.0)), rows[i][1]) for i in order]


def check_query(q: SearchQuery, dim: int | None) -> np.ndarray:
    v = np.asarray(q.vector, dtype=np.float32).reshape(-1)
    if not np.isfinite(v).all():
        raise ValueError("query vector contains NaN or infinite values")
    if dim is not None and v.shape[0] != dim:
        raise ValueError(f"query vector has dim {v.shape[0]} but the index holds vectors of dim {dim}")
    return v


__all__ = ["IndexError_", "IndexHit", "Record", "SearchQuery", "VectorIndex", "check_query", "cosine_rank"]
