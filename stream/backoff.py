"""Exponential back-off with full jitter, shared by every retry loop that talks to a server
(Redis waits, the Kafka emitter, the broker probe)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n sleeps uniform(0, min(max, initial*m^n)).

    Full jitter (rather than a fixed doubling) spreads reconnects of many workers that lost
    Redis at the same moment."""

    initial_s: float = 0.05
    max_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return random.uniform(0.0, ceiling)
