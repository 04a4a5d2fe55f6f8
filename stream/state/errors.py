"""What can go wrong with a conversation's memory state, as one exception hierarchy.

`StoreUnavailable` (stream/state/availability.py) is deliberately NOT part of it: that one
means "retry later, nothing lost", while everything here is a verdict a retry will not change.
"""

from __future__ import annotations


class MemoryStateError(RuntimeError):
    """A memory-state operation failed for a reason a retry will not cure."""


class MemoryCorrupt(MemoryStateError):
    """Stored bytes do not rebuild a consistent state (missing base or deltas, truncated,
    foreign shape, seq skew, another conversation's identity)."""


class StaleDelete(MemoryStateError):
    """A replayed delete record older than the conversation's current generation (which began
    after it): applying it again would erase turns published after the delete."""


class UnsafeRedisConfig(MemoryStateError):
    """The Redis server (or our access to it) is configured so that the worker cannot run
    safely: memory states could vanish silently, or the credentials are refused. A restart
    cannot fix either, so the worker says so in one line and exits."""


class FingerprintMismatch(MemoryStateError):
    """The conversation was written by a different model.

    Continuing someone else's latent memory with another model would silently produce wrong
    embeddings, so this is an error, never a fallback."""

    def __init__(self, conversation_id: str, stored: str, expected: str) -> None:
        super().__init__(
            f"conversation {conversation_id!r} was checkpointed under model fingerprint "
            f"{stored!r}, but this worker runs {expected!r}; refusing to continue its memory "
            f"(delete it or route it to a worker with the matching model)"
        )
        self.conversation_id = conversation_id
        self.stored = stored
        self.expected = expected
