"""While Redis is unavailable, full, or not the store we wrote, the batch is held, never
dropped: consumption pauses and the same operation is retried once the store can be used.

Three ways a store operation can fail that a retry cures (stream/state/availability.py):

* unreachable (refused, timed out, failing over): wait until it answers a ping, then retry;
* reachable but refusing writes (`OOM` at maxmemory with `noeviction`, `READONLY`, `BUSY`):
  a ping answers at once, so "wait until it answers" is no wait at all; the retries are
  spaced by their own exponential back-off (at most one per `store_retry_backoff_max_s`,
  never less than half of it once reached), or the worker would hammer a full Redis with
  thousands of commands a second (issue #17 item 5);
* lost (stream/state/epoch.py: emptied, replaced, behind, being rebuilt): only an operator's
  decision cures it; the batch is held until the store can be trusted again, and what this
  worker cached from the old store is dropped before the retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from stream.state.availability import StoreUnavailable, is_full
from stream.state.epoch import StoreLost

log = logging.getLogger(__name__)
T = TypeVar("T")


class PauseOnOutage:
    def __init__(self, store: Any, metrics: Any, *, retry_max_s: float = 5.0, retry_initial_s: float = 0.05) -> None:
        self.store = store
        self.metrics = metrics
        self.paused = False
        self.reason: str | None = None  # "unavailable" | "full" | "lost" | "building" while paused
        self.retry_max_s = retry_max_s
        self.retry_initial_s = retry_initial_s
        self.on_new_store: list[Callable[[], None]] = []  # called after a lost store is trusted again
        self._refusals = 0

    def _delay(self) -> float:
        """Equal-jitter exponential back-off: between half and all of the ceiling, so that the
        retry rate against a store that answers but refuses is bounded."""
        ceiling = min(self.retry_max_s, self.retry_initial_s * 2 ** min(self._refusals, 32))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)

    async def __call__(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a store operation; while the store cannot be used, pause (hold this batch) and retry."""
        watch = getattr(self.store, "epoch", None)
        if watch is not None and watch.required and not watch.opened:
            await watch.wait_opened()  # a worker processes nothing before it knows its store
        while True:
            try:
                result = await op()
                if self.paused:
                    self.paused, self.reason, self._refusals = False, None, 0
                    self.metrics.paused.set(0)
                    log.info("memory-state store back; resuming")
                return result
            except StoreLost as exc:
                self._pause(watch.kind if watch is not None and watch.kind else "lost", what, exc)
                await watch.wait_for_decision() if watch is not None else await asyncio.sleep(1.0)
                for fn in self.on_new_store:
                    fn()
            except StoreUnavailable as exc:
                full = is_full(exc)
                self._pause("full" if full else "unavailable", what, exc)
                await self.store.server.wait_until_available()
                if full or self._refusals:
                    # it answers a ping but refused the operation: space the retries out
                    await asyncio.sleep(self._delay())
                self._refusals += 1

    def _pause(self, reason: str, what: str, exc: BaseException) -> None:
        if not self.paused or reason != self.reason:
            self.metrics.store_unavailable.inc()
            log.warning("memory-state store %s during %s (%s): pausing consumption", reason, what, exc)
        self.paused, self.reason = True, reason
        self.metrics.paused.set(1)
