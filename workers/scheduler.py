"""What runs in each forward pass (the "scheduler" half of vLLM's split; no tensors here).

Two rules decide it:
- *waves*: a conversation's second turn in a batch needs the memory its first turn leaves, so
  wave k holds the k-th pending turn of every conversation; passes never mix two turns of one
  conversation.
- *token budget*: inside a wave, rows are sorted by length and cut into passes whose padded
  size (rows x longest row) stays within `max_batch_tokens`. A row longer than the budget runs
  alone rather than waiting forever (text-embeddings-inference issue #723 is the cautionary tale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Budget:
    max_batch_tokens: int = 32768   # padded tokens per forward pass
    max_batch_rows: int = 64

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_rows < 1:
            raise ValueError("token budget and row limit must be positive")


@dataclass(frozen=True)
class SegmentRule:
    """The reference's grouping of turns into memory segments."""

    max_turns: int = 16
    max_tokens: int = 2048

    def opens_new_segment(self, turns_in_segment: int, tokens_in_segment: int, turn_tokens: int) -> bool:
        return (
            turns_in_segment == 0
            or turns_in_segment >= self.max_turns
            or tokens_in_segment + turn_tokens > self.max_tokens
        )


def plan_waves(conversation_ids: Sequence[str]) -> list[list[int]]:
    """Indices grouped so that wave k holds the k-th occurrence of each conversation, in
    input order; within a conversation the input order is the application order."""
    seen: dict[str, int] = {}
    waves: list[list[int]] = []
    for i, cid in enumerate(conversation_ids):
        k = seen.get(cid, 0)
        seen[cid] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(i)
    return waves


def pack(lengths: Sequence[int], budget: Budget) -> list[list[int]]:
    """Cut row indices into passes within the budget, longest first (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    passes: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and ((len(cur) + 1) * new_max > budget.max_batch_tokens or len(cur) >= budget.max_batch_rows):
            passes.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        passes.append(cur)
    return passes
