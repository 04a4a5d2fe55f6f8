"""Rate-limit repetitive log lines of the Kafka client libraries, with a count of what was cut.

Why: with the broker gone, aiokafka (and faust/mode around it) log one error per retry --
connection, metadata, fetch, coordinator -- about 20 lines a second, 11,441 lines in 4 minutes
for one orphaned worker. The worker states the outage itself in one line per transition
(stream/kafka/broker_health.py); the library lines add only repetition. This filter lets the first
`burst` lines of each kind through per `window_s` and drops the rest; the first line of a kind
after its window says how many were dropped, so nothing disappears without a trace.

"Kind" = logger name + level + message template with digits masked (node ids, ports,
correlation ids differ between otherwise identical lines). Only loggers under `prefixes` are
limited: evostream's own lines (dead letters, outages) are already one per event or per
transition and are never dropped.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_PREFIXES = ("aiokafka", "faust", "mode", "kafka")
_DIGITS = re.compile(r"\d+")


@dataclass
class _Window:
    start: float
    passed: int = 1
    dropped: int = 0


class RepeatLimitFilter(logging.Filter):
    def __init__(self, window_s: float = 60.0, burst: int = 3, prefixes: tuple[str, ...] | list[str] = DEFAULT_PREFIXES,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 4096):
        super().__init__()
        self.window_s = float(window_s)
        self.burst = max(1, int(burst))
        self.prefixes = tuple(prefixes)
        self.clock = clock
        self.max_kinds = max_kinds
        self.dropped_total = 0
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()  # faust's consumer logs from its own thread

    def _limited(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._limited(record.name):
            return True
        key = (record.name, record.levelno, _DIGITS.sub("#", str(record.msg))[:300])
        now = self.clock()
        with self._lock:
            w = self._windows.get(key)
            if w is None or now - w.start >= self.window_s:
                dropped = w.dropped if w is not None else 0
                if len(self._windows) >= self.max_kinds:
                    self._windows.clear()  # bound memory against unbounded message variety
                self._windows[key] = _Window(start=now)
                if dropped:
                    record.msg = (f"{record.msg} [{dropped} similar line(s) suppressed in the preceding "
                                  f"{self.window_s:.0f} s]")
                return True
            if w.passed < self.burst:
                w.passed += 1
                return True
            w.dropped += 1
            self.dropped_total += 1
            return False
