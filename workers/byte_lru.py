"""The bookkeeping the model-side caches share: entries per conversation key, bounded by bytes,
least recently used evicted first, every event reported to a metric hook.

Why bytes and not a count: a cached entry of one conversation can be 20x another's (a segment's
first turn vs its largest row; Qwen3.5's fixed linear-attention states vs Qwen3's per-position
keys), so only a byte bound keeps a worker's memory predictable (workers/memory_budget.py).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

CacheEvent = Callable[[str, int], None]
"""Metric hook: called as hook(event, nbytes) with event in hit | miss | stale | store | evict | reject."""


class ByteLRU:
    """Subclasses keep entries with an `nbytes` attribute in `_entries` and a `stats` object
    with `evictions` and `rejected` counters."""

    stats: Any

    def __init__(self, max_bytes: int, on_event: CacheEvent | None = None):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.on_event = on_event
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conv_key: str) -> bool:
        return conv_key in self._entries

    def _emit(self, event: str, nbytes: int) -> None:
        if self.on_event is not None:
            self.on_event(event, nbytes)

    def _make_room(self, n: int) -> bool:
        """Room for an entry of `n` bytes: False (a `reject`) when it exceeds the whole budget,
        else least recently used entries are evicted until it fits."""
        if n > self.max_bytes:
            self.stats.rejected += 1
            self._emit("reject", n)
            return False
        while self._entries and self.bytes + n > self.max_bytes:
            key = next(iter(self._entries))
            old = self._entries[key]
            self.discard(key)
            self.stats.evictions += 1
            self._evicted(old)
            self._emit("evict", old.nbytes)
        return True

    def _evicted(self, entry: Any) -> None:
        """Hook: an entry left by eviction (after `discard`)."""

    def discard(self, conv_key: str) -> None:
        e = self._entries.pop(conv_key, None)
        if e is not None:
            self.bytes -= e.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
