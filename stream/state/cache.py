"""Hot conversation states in memory, bounded by bytes (not by count).

States differ in size by orders of magnitude (an empty conversation vs a full 512-latent queue
plus an open segment), so a count bound either wastes memory or blows it. Redis holds the
truth; this cache only saves a load. Entries remember their source partition so that a
revoked partition's conversations can be dropped at once, and the generation they belong to
(a commit must name it).

A batch that is still in flight when its partition is revoked must not put its states back
afterwards: the next owner advances them, and anything that reads this cache (queries) would
serve the stale copy. So the cache knows which partitions are assigned, and `put` for any
other partition is refused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from stream.identity import ConversationRef
from workers.state import ConversationState


@dataclass
class CachedState:
    state: ConversationState
    gen: int
    partition: int
    nbytes: int
    gen_start: tuple[int, int] | None = None


class StateCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ConversationRef, CachedState] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.refused = 0
        self._assigned: set[int] | None = None  # None: not tracked (every partition accepted)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ref: ConversationRef) -> bool:
        return ref in self._entries

    def get(self, ref: ConversationRef) -> ConversationState | None:
        e = self.entry(ref)
        return e.state if e is not None else None

    def entry(self, ref: ConversationRef) -> CachedState | None:
        e = self._entries.get(ref)
        if e is None:
            self.misses += 1
            return None
        self._entries.move_to_end(ref)
        self.hits += 1
        return e

    def put(self, ref: ConversationRef, state: ConversationState, partition: int, gen: int = 1,
            gen_start: tuple[int, int] | None = None) -> bool:
        """Cache a state that was just committed; False if refused (partition not assigned,
        or larger than the whole budget)."""
        self.discard(ref)
        if self._assigned is not None and partition not in self._assigned:
            self.refused += 1
            return False
        n = state.nbytes()
        if n > self.max_bytes:
            return False  # larger than the whole budget: not cached, always loaded
        self._entries[ref] = CachedState(state, gen, partition, n, gen_start)
        self.bytes += n
        while self.bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        return True

    def discard(self, ref: ConversationRef) -> None:
        e = self._entries.pop(ref, None)
        if e is not None:
            self.bytes -= e.nbytes

    def assign(self, partitions: set[int]) -> None:
        """The partitions this worker owns now (from the rebalance listener)."""
        self._assigned = set(partitions)
        self.drop_partitions({e.partition for e in self._entries.values()} - self._assigned)

    def revoke(self, partitions: set[int]) -> int:
        """Stop owning `partitions`: drop their states and refuse them until reassigned."""
        if self._assigned is None:
            self._assigned = set()
        self._assigned -= partitions
        return self.drop_partitions(partitions)

    def drop_partitions(self, partitions: set[int]) -> int:
        gone = [ref for ref, e in self._entries.items() if e.partition in partitions]
        for ref in gone:
            self.discard(ref)
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
