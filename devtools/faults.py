"""TEST-ONLY fault injection, installed by the test harness, never by production code.

The chaos suite (tests/test_chaos.py) needs to hit the narrow windows that make the commit
protocol's order matter -- inside the model step, between the Redis checkpoint and the emit,
between the emit and the outbox clear, between that and the offset acknowledgement -- which a
SIGKILL from outside hits only by luck. The commit protocol names those windows
(`stream.processing.commit.STAGES`) and lets observers watch them; this module registers an
observer that kills (or freezes) the process at an armed stage.

Run a worker with faults armed by the environment:

    python -m devtools.faults worker      # same arguments as `python -m stream.cli`

    EVOSTREAM_FAULT_POINT   comma-separated stage names (see STAGES), or "any"
    EVOSTREAM_FAULT_PROB    probability per visit of an armed stage (default 1.0)
    EVOSTREAM_FAULT_ACTION  "kill" (default): SIGKILL this process, no shutdown code runs;
                            "stop": SIGSTOP this process (a frozen worker that becomes a zombie
                            once its session times out; the harness SIGCONTs it later)
    EVOSTREAM_FAULT_SKIP    visits of armed stages to let pass before the first fault (default 0)
    EVOSTREAM_FAULT_MAX     most faults one process injects (default 1; "stop" faults resume)
    EVOSTREAM_FAULT_SEED    seed of the coin flips (default: random)
    EVOSTREAM_FAULT_DISABLE_CODECS  codecs (gzip, snappy, lz4, zstd) aiokafka is made to believe
                            are missing: reproduces an unreadable record batch

Before acting it writes one line `EVOSTREAM_FAULT <action> <point> pid=<pid>` to stderr so the
harness can tell which window a crash hit.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from collections.abc import Mapping

from stream.kafka.unreadable import CODECS
from stream.processing.commit import STAGES, observe_stages

log = logging.getLogger(__name__)

POINTS = STAGES
CODECS_ENV = "EVOSTREAM_FAULT_DISABLE_CODECS"


class Injector:
    def __init__(self, env: Mapping[str, str]) -> None:
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


def disable_codecs_for_tests(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """Make aiokafka believe the libraries of the codecs named in EVOSTREAM_FAULT_DISABLE_CODECS
    are missing (reproduces an unreadable batch)."""
    env = os.environ if env is None else env
    names = frozenset(n.strip() for n in env.get(CODECS_ENV, "").split(",") if n.strip())
    unknown = names - set(CODECS)
    if unknown:
        raise ValueError(f"{CODECS_ENV}: unknown codec(s) {sorted(unknown)}; known: {CODECS}")
    if names:
        from aiokafka import codec

        for name in names:
            setattr(codec, f"has_{name}", lambda: False)
        log.warning("TEST-ONLY fault: codecs %s reported unavailable to aiokafka", sorted(names))
    return names


def install_from_env(env: Mapping[str, str]) -> None:
    if env.get("EVOSTREAM_FAULT_POINT", "").strip():
        observe_stages(Injector(env))
    disable_codecs_for_tests(env)


def main(argv: list[str] | None = None) -> int:
    install_from_env(os.environ)
    from stream.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
