"""Query-ready memory: the retriever's work over each conversation's queue, kept between turns.

Why: every query embedding, and the next turn's own embedding, is a retriever pass over
`mem_to_latent(queue), own tokens`. The queue (up to 512 latents) changes only when a turn is
applied, yet without this cache every query recomputed it: at the 0.8B shape the queue is ~550 of
a query's ~570 positions (issue #22). So after a turn is applied the engine runs the retriever over
the new queue once (workers/engine.py `_refresh_ready`) and keeps what `prefix_pass` leaves at the
end of it: the keys and values of the full-attention layers and, for Qwen3.5, the linear-attention
recurrent and convolution states. A query or the next turn then computes only its own tokens.

What an entry is valid for, and why no entry is ever stale: the retriever's work over the first
k queue positions depends only on the model and on those k latents. An entry records k and
`ConversationState.queue_digest(k)` (a hash of the dtype, shape and bytes of `queue[:k]`), and a
lookup hashes the asking state's own queue: a state that moved on, went back (a replay, a reload
at an older seq), was reset or belongs to another generation has other bytes and misses; a state
reloaded from Redis with the same bytes hits, and is served exactly. The cache lives in the
engine, so the model (fingerprint, dtype) is fixed for its lifetime. As with the prefix cache,
Qwen3.5 entries end on the linear-attention kernel's 64-position chunk grid (prefix_pass.py);
the few queue positions after k are recomputed with the query's own tokens.

Bounded by bytes, least recently used evicted; one entry per conversation (a conversation's new
entry replaces its old one). Entries are found by content (queries carry a state, not a key) and
replaced by conversation key (the engine's step knows which conversation it advanced).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from workers.byte_lru import ByteLRU, CacheEvent
from workers.prefix_pass import PrefixState
from workers.state import ConversationState

ReadyKey = tuple[int, str]
"""(k, digest of queue[:k]): what an entry's work depends on."""


@dataclass
class _Entry:
    key: ReadyKey
    state: PrefixState
    nbytes: int
    used: bool = False


@dataclass
class QueryCacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    evicted_unused: int = 0   # evicted before any query or turn read it: the budget is too small
    rejected: int = 0


class QueryCache(ByteLRU):
    def __init__(self, max_bytes: int, on_event: CacheEvent | None = None):
        super().__init__(max_bytes, on_event)
        self._by_key: dict[ReadyKey, str] = {}
        self.stats = QueryCacheStats()

    # -- lookups ---------------------------------------------------------------------------
    def find(self, state: ConversationState, k: int) -> PrefixState | None:
        """The retriever's state over `state.queue[:k]`, whoever's conversation computed it, or
        None (a miss)."""
        conv = self._by_key.get((k, state.queue_digest(k))) if k > 0 else None
        if conv is None:
            self.stats.misses += 1
            self._emit("miss", 0)
            return None
        e = self._entries[conv]
        self._entries.move_to_end(conv)
        e.used = True
        self.stats.hits += 1
        self._emit("hit", e.nbytes)
        return e.state

    def continuation(self, conv_key: str, state: ConversationState) -> PrefixState | None:
        """This conversation's entry if it still covers a prefix of `state`'s queue (the queue
        grew without dropping latents), so the new entry continues it instead of starting at 0."""
        e = self._entries.get(conv_key)
        if e is None:
            return None
        k = e.key[0]
        if k > state.queue.shape[0] or state.queue_digest(k) != e.key[1]:
            return None
        return e.state

    def peek(self, conv_key: str) -> PrefixState | None:
        """The entry held for `conv_key`, unvalidated and untouched (benchmarks measure it)."""
        e = self._entries.get(conv_key)
        return e.state if e is not None else None

    # -- updates ---------------------------------------------------------------------------
    def store(self, conv_key: str, state: ConversationState, ready: PrefixState) -> bool:
        """Keep `ready` (the retriever over `state.queue[:ready.length]`) as `conv_key`'s entry."""
        self.discard(conv_key)
        n = ready.nbytes()
        if not self._make_room(n):
            return False
        key = (ready.length, state.queue_digest(ready.length))
        other = self._by_key.get(key)
        if other is not None:  # two conversations with the same queue bytes: one entry serves both
            self.discard(other)
        self._entries[conv_key] = _Entry(key, ready, n)
        self._by_key[key] = conv_key
        self.bytes += n
        self.stats.stores += 1
        self._emit("store", n)
        return True

    def clone(self) -> "QueryCache":
        """An independent cache with the same entries (entries are never changed in place, so
        they are shared): a benchmark repeats a step from the same cache."""
        other = QueryCache(self.max_bytes, self.on_event)
        other._entries = OrderedDict((k, _Entry(e.key, e.state, e.nbytes, e.used)) for k, e in self._entries.items())
        other._by_key = dict(self._by_key)
        other.bytes = self.bytes
        return other

    def _evicted(self, entry: _Entry) -> None:
        self.stats.evicted_unused += not entry.used

    def discard(self, conv_key: str) -> None:
        e = self._entries.get(conv_key)
        super().discard(conv_key)
        if e is not None and self._by_key.get(e.key) == conv_key:
            del self._by_key[e.key]

    def clear(self) -> None:
        super().clear()
        self._by_key.clear()
