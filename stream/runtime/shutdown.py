"""Bounded shutdown: after SIGTERM/SIGINT the worker is gone within `shutdown_grace_s`,
broker up or down, and its exit code says whether the shutdown was clean.

Why: faust stops its consumer first, and aiokafka's consumer stop commits offsets and leaves
the group -- with the broker unreachable that waits (`TimeoutError`, `CancelledError` in the
consumer thread) and the process was measured still running 60 s after SIGTERM. Kubernetes
then waits out every pod's grace period during a broker incident and finally SIGKILLs it.

What happens on the first signal:
1. `on_begin` runs at once (the worker stops taking batches and reports not ready);
2. faust's normal shutdown proceeds (agents, consumer, producer, web);
3. a watchdog thread -- a thread, because the event loop may be the thing that is stuck --
   ends the process with EXIT_GRACE_EXCEEDED once the grace has passed.

Nothing is lost either way: a batch in flight is not acknowledged, so the next owner of its
partition replays it (turns already checkpointed are skipped, their events re-emitted from the
outbox). Exit codes: 0 = clean (the orderly shutdown finished with the broker reachable:
offsets committed, group left, clients closed); EXIT_UNCLEAN (75, EX_TEMPFAIL) = the grace ran
out, or the shutdown finished while the broker was unreachable (its last offsets could not be
committed: expect replays); 70 = a batch failed unexpectedly (stream/runtime/worker.py).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_UNCLEAN = 75
EXIT_GRACE_EXCEEDED = EXIT_UNCLEAN


class ShutdownGuard:
    def __init__(self, grace_s: float, on_begin: Callable[[], None] | None = None,
                 exit: Callable[[int], None] = os._exit):
        self.grace_s = grace_s
        self.on_begin = on_begin
        self._exit = exit
        self.started_at: float | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self.started_at is not None

    def begin(self, reason: str) -> None:
        """First call: start the clock; later calls (a second SIGTERM) change nothing."""
        with self._lock:
            if self.started_at is not None:
                return
            self.started_at = time.monotonic()
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        log.info("shutting down (%s): no new batches; exiting within %.0f s (shutdown_grace_s)", reason, self.grace_s)
        if self.on_begin is not None:
            try:
                self.on_begin()
            except Exception:  # noqa: BLE001 - the shutdown must go on
                log.exception("shutdown hook failed")

    def finished(self, clean: bool = True, why: str = "") -> int:
        """The orderly shutdown completed: cancel the watchdog; returns the exit code."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        took = time.monotonic() - self.started_at if self.started_at is not None else 0.0
        if clean:
            log.info("shutdown complete in %.1f s", took)
            return EXIT_CLEAN
        log.warning("shutdown finished in %.1f s but not cleanly (%s): exiting with %d; records not committed "
                    "will be replayed by the partition's next owner", took, why, EXIT_UNCLEAN)
        return EXIT_UNCLEAN

    def _expire(self) -> None:
        log.critical("shutdown did not finish within %.0f s (shutdown_grace_s; broker or Redis unreachable?): "
                     "exiting with %d; the batch in flight was not acknowledged and will be replayed by the "
                     "partition's next owner", self.grace_s, EXIT_GRACE_EXCEEDED)
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stderr.flush()
        self._exit(EXIT_GRACE_EXCEEDED)
