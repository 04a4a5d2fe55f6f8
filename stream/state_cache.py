"""Hot conversation states in memory, bounded by bytes (not by count).

States differ in size by orders of magnitude (an empty conversation vs a full 512-latent queue
plus an open segment), so a count bound either wastes memory or blows it. Redis holds the
truth; this cache only saves a load. Entries remember their source partition so that a
revoked partition's conversations can be dropped at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from workers.state import ConversationState


@dataclass
class _Entry:
    state: ConversationState
    partition: int
    nbytes: int


class StateCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cid: str) -> bool:
        return cid in self._entries

    def get(self, cid: str) -> ConversationState | None:
        e = self._entries.get(cid)
        if e is None:
            self.misses += 1
            return None
        self._entries.move_to_end(cid)
        self.hits += 1
        return e.state

    def put(self, cid: str, state: ConversationState, partition: int) -> None:
        self.discard(cid)
        n = state.nbytes()
        if n > self.max_bytes:
            return  # larger than the whole budget: not cached, always loaded
        self._entries[cid] = _Entry(state, partition, n)
        self.bytes += n
        while self.bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

    def refresh(self, cid: str) -> None:
        """Re-measure an entry whose state was advanced in place."""
        e = self._entries.get(cid)
        if e is not None:
            self.put(cid, e.state, e.partition)

    def discard(self, cid: str) -> None:
        e = self._entries.pop(cid, None)
        if e is not None:
            self.bytes -= e.nbytes

    def drop_partitions(self, partitions: set[int]) -> int:
        gone = [cid for cid, e in self._entries.items() if e.partition in partitions]
        for cid in gone:
            self.discard(cid)
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
