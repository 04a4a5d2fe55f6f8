"""TEST-ONLY fault injection: crash (or freeze) the worker at a named point of the pipeline.

The chaos suite (tests/test_chaos.py) needs to hit the narrow windows that make the pipeline's
ordering matter -- inside the model step, between the Redis checkpoint and the emit, between
the emit and the outbox ack, between the ack and the offset commit -- which a SIGKILL from
outside hits only by luck. `stream/processing/pipeline.py` calls `fault_point(name)` at those places.

This module is a no-op unless `EVOSTREAM_FAULT_POINT` is set; never set it in production.

    EVOSTREAM_FAULT_POINT   comma-separated point names (see POINTS), or "any"
    EVOSTREAM_FAULT_PROB    probability per visit of an armed point (default 1.0)
    EVOSTREAM_FAULT_ACTION  "kill" (default): SIGKILL this process, no shutdown code runs;
                            "stop": SIGSTOP this process (a frozen worker that becomes a zombie
                            once its session times out; the harness SIGCONTs it later)
    EVOSTREAM_FAULT_SKIP    visits of armed points to let pass before the first fault (default 0)
    EVOSTREAM_FAULT_MAX     most faults one process injects (default 1; "stop" faults resume)
    EVOSTREAM_FAULT_SEED    seed of the coin flips (default: random)

Before acting it writes one line `EVOSTREAM_FAULT <action> <point> pid=<pid>` to stderr so the
harness can tell which window a crash hit.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Callable

POINTS = ("in_step", "after_checkpoint", "after_emit", "after_ack")
"""in_step: the model step ran (states advanced in memory), nothing written;
after_checkpoint: Redis has the new states and the outbox, nothing emitted;
after_emit: the broker has the embeddings, the outbox still holds them;
after_ack: outbox cleared, the input offsets not yet acknowledged/committed."""


class _Injector:
    def __init__(self, env: dict[str, str]) -> None:
        raw = env.get("EVOSTREAM_FAULT_POINT", "").strip()
        names = {p.strip() for p in raw.split(",") if p.strip()}
        if "any" in names:
            names = set(POINTS)
        unknown = names - set(POINTS)
        if unknown:
            raise ValueError(f"EVOSTREAM_FAULT_POINT: unknown point(s) {sorted(unknown)}; known: {POINTS}")
        self.points = frozenset(names)
        self.prob = float(env.get("EVOSTREAM_FAULT_PROB", "1"))
        self.action = env.get("EVOSTREAM_FAULT_ACTION", "kill").strip() or "kill"
        if self.action not in ("kill", "stop"):
            raise ValueError(f"EVOSTREAM_FAULT_ACTION must be kill|stop, not {self.action!r}")
        self.skip = int(env.get("EVOSTREAM_FAULT_SKIP", "0"))
        self.remaining = int(env.get("EVOSTREAM_FAULT_MAX", "1"))
        seed = env.get("EVOSTREAM_FAULT_SEED")
        self.rng = random.Random(int(seed) if seed else None)

    def __call__(self, point: str) -> None:
        if point not in self.points or self.remaining <= 0:
            return
        if self.skip > 0:
            self.skip -= 1
            return
        if self.rng.random() >= self.prob:
            return
        self.remaining -= 1
        sys.stderr.write(f"EVOSTREAM_FAULT {self.action} {point} pid={os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)


def _noop(point: str) -> None:
    return None


def _make() -> Callable[[str], None]:
    if not os.environ.get("EVOSTREAM_FAULT_POINT", "").strip():
        return _noop
    return _Injector(dict(os.environ))


fault_point = _make()
"""`fault_point(name)`: inject the configured fault if `name` is armed; otherwise nothing."""
