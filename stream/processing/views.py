"""Where each conversation of a batch stands before its turns are applied: from the state cache
when this worker committed it last, otherwise from Redis (one round trip for all of them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.events import MemoryOrigin
from stream.identity import ConversationRef
from stream.processing.outage import PauseOnOutage
from stream.state.cache import StateCache
from stream.state.records import MemoryProblem
from workers.state import ConversationState


@dataclass
class View:
    """Where a conversation stands for this batch."""

    state: ConversationState
    gen: int
    seq: int  # the (gen, seq) a commit must name (compare-and-set)
    origin: MemoryOrigin
    fresh: bool  # no live state: the first commit starts generation `gen`
    outbox: dict[int, bytes] = field(default_factory=dict)
    gap_rejects: int = 0
    gen_start: tuple[int, int] | None = None  # (partition, offset) where the live generation began
    deleted_at: tuple[int, int] | None = None  # (partition, offset) of the delete that ended it
    restarted: bool = False  # a turn published after the delete restarted the seqs
    held: tuple[int, str] | None = None  # (seq, reason): a quarantined turn the later ones wait behind


class ViewLoader:
    def __init__(self, cache: StateCache, store: Any, guard: PauseOnOutage, metrics: Any) -> None:
        self.cache = cache
        self.store = store
        self.guard = guard
        self.metrics = metrics

    async def load(self, refs: list[ConversationRef]) -> tuple[dict[ConversationRef, View],
                                                             dict[ConversationRef, MemoryProblem]]:
        views: dict[ConversationRef, View] = {}
        missing = []
        for ref in refs:
            e = self.cache.entry(ref)
            if e is None:
                missing.append(ref)
                self.metrics.cache_misses.inc()
            else:
                views[ref] = View(e.state, e.gen, e.state.seq, MemoryOrigin.CONTINUED, fresh=False,
                                  gen_start=e.gen_start)
                self.metrics.cache_hits.inc()
        problems: dict[ConversationRef, MemoryProblem] = {}
        if missing:
            loaded = await self.guard(lambda: self.store.load_many(missing), "load")
            for ref, got in loaded.items():
                if isinstance(got, MemoryProblem):
                    problems[ref] = got
                else:
                    # a cached state has no pending outbox we do not already know about:
                    # events are emitted in the batch that commits them
                    views[ref] = View(got.state, got.gen, got.seq, got.origin, fresh=not got.live,
                                      outbox=got.outbox, gap_rejects=got.gap_rejects, gen_start=got.gen_start,
                                      deleted_at=got.deleted_at, held=got.held)
        return views, problems

    async def reload(self, states: dict[str, ConversationState], refs: set[ConversationRef]) -> None:
        """Replace in-memory states (keyed by tag) with what Redis holds, the source of truth."""
        for ref in refs:
            self.cache.discard(ref)
        views, _ = await self.load(list(refs))
        for ref, v in views.items():
            states[ref.tag] = v.state
