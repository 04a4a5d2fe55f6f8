"""While Redis is unavailable the batch is held, never dropped: consumption pauses and the
same operation is retried once the store answers again."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from stream.state.availability import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class PauseOnOutage:
    def __init__(self, store: Any, metrics: Any) -> None:
        self.store = store
        self.metrics = metrics
        self.paused = False

    async def __call__(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a store operation; while Redis is unavailable, pause (hold this batch) and retry."""
        while True:
            try:
                result = await op()
                if self.paused:
                    self.paused = False
                    self.metrics.paused.set(0)
                    log.info("memory-state store back; resuming")
                return result
            except StoreUnavailable as exc:
                if not self.paused:
                    self.metrics.store_unavailable.inc()
                    log.warning("memory-state store unavailable during %s (%s): pausing consumption", what, exc)
                self.paused = True
                self.metrics.paused.set(1)
                await self.store.server.wait_until_available()
