"""Per-conversation cache of the open segment's memory prefix (what `prefix_pass` computed).

Why it is safe to be lossy: an entry only saves work. A missing entry (worker restart, eviction,
partition moved to another worker) means the next turn recomputes its segment from the snapshot,
which gives the same numbers; so the cache is bounded by bytes and evicts least recently used.

Why it is validated and not just keyed: the engine sees conversations by an opaque key
(`TurnInput.conversation_id`; the pipeline passes a hash of tenant and conversation there), and a
conversation's state can change behind the cache's back (a replayed or skipped turn, a reset after
expiry or delete, a state reloaded from Redis after a rebalance). Each entry therefore records
which state it continues: `prefix_key(state)` = (seq, snapshot length, turns and tokens in the
segment, digest of the segment's token ids and of sampled snapshot rows). A lookup whose key does
not match is a stale entry: it is dropped and reported, never used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from workers.byte_lru import ByteLRU, CacheEvent
from workers.prefix_pass import PrefixState
from workers.state import ConversationState

__all__ = ["CacheEvent", "PrefixCache", "PrefixCacheStats", "PrefixKey", "prefix_key"]

PrefixKey = tuple[int, int, int, int, str]


def prefix_key(state: ConversationState) -> PrefixKey:
    """What a cached prefix depends on: the snapshot and the segment's token ids (plus seq, so a
    state that moved on, or back, never matches)."""
    h = hashlib.blake2b(digest_size=12)
    for turn in state.segment_token_ids:
        h.update(np.asarray(turn, dtype=np.int32).tobytes())
        h.update(b"|")
    snap = state.snapshot
    if snap.shape[0]:
        # three sampled rows: cheap, and a reset/reloaded conversation differs in all of them
        for i in sorted({0, snap.shape[0] // 2, snap.shape[0] - 1}):
            h.update(snap[i].float().numpy().tobytes())
    return (state.seq, state.snapshot_len, len(state.segment_token_ids), state.segment_tokens, h.hexdigest())


@dataclass
class _Entry:
    key: PrefixKey
    prefix: PrefixState
    nbytes: int


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    evictions: int = 0
    rejected: int = 0


class PrefixCache(ByteLRU):
    def __init__(self, max_bytes: int, on_event: CacheEvent | None = None):
        super().__init__(max_bytes, on_event)
        self.stats = PrefixCacheStats()

    def lookup(self, conv_key: str, state: ConversationState) -> PrefixState | None:
        """The prefix that continues `state`, or None (a miss; a stale entry is dropped)."""
        e = self._entries.get(conv_key)
        if e is None:
            self.stats.misses += 1
            self._emit("miss", 0)
            return None
        if e.key != prefix_key(state):
            self.discard(conv_key)
            self.stats.stale += 1
            self.stats.misses += 1
            self._emit("stale", e.nbytes)
            return None
        self._entries.move_to_end(conv_key)
        self.stats.hits += 1
        self._emit("hit", e.nbytes)
        return e.prefix

    def store(self, conv_key: str, state: ConversationState, prefix: PrefixState) -> bool:
        """Keep `prefix` as the continuation of `state` (the state after the turn that computed it)."""
        self.discard(conv_key)
        n = prefix.nbytes()
        if not self._make_room(n):
            return False
        self._entries[conv_key] = _Entry(prefix_key(state), prefix, n)
        self.bytes += n
        self._emit("store", n)
        return True

    def peek(self, conv_key: str) -> PrefixState | None:
        """The entry held for `conv_key` without validating or touching it (benchmarks measure
        its size); None when there is none."""
        e = self._entries.get(conv_key)
        return e.prefix if e is not None else None

    def clone(self) -> "PrefixCache":
        """An independent cache holding the same entries (entries are never mutated in place, so
        they are shared): lets a benchmark run the same step twice from the same cache."""
        other = PrefixCache(self.max_bytes, self.on_event)
        other._entries = OrderedDict(self._entries)
        other.bytes = self.bytes
        return other
