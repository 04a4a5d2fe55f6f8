"""Redis availability: one exception for "the store cannot be reached", and a bounded wait.

Why a separate module: the pipeline's reaction to an unreachable store is always the same —
pause consumption, wait, retry the same batch — and never "drop the batch". So every Redis
failure that a retry can cure (refused connection, timeout, a server still loading its data
after a restart, a replica that is read-only during failover, OOM until eviction frees room)
is folded into ONE exception type, `StoreUnavailable`, and the wait is a small reusable loop
with exponential backoff and full jitter (so a fleet of workers does not reconnect in step).
Everything else (a bug in a script, a wrong type on a key) is not retryable and propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from redis import exceptions as rex

from stream.backoff import Backoff

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The checkpoint store cannot be reached (or cannot accept writes) right now.

    Nothing was lost: the caller keeps its batch, pauses, and retries after
    `wait_until_available`. Commits are compare-and-set on seq, so a retry of a batch that did
    in fact reach Redis is harmless."""


# Errors that a later retry can cure. ConnectionError covers refused/reset sockets,
# BusyLoadingError (server loading its dataset after restart) and MaxConnectionsError.
_RETRYABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.TryAgainError,
    rex.ClusterDownError,
    # Redis Cluster (issue #8): redis-py's cluster client follows MOVED/ASK itself; what it
    # could not absorb within its retries (a slot still moving, a failover) surfaces as these.
    # A bare MOVED/ASK is NOT retryable: it means a plain redis:// client talks to a cluster
    # node, which no retry cures (use redis+cluster://).
    rex.ClusterError,  # "TTL exhausted" while following redirections
    rex.SlotNotCoveredError,
    asyncio.TimeoutError,
    ConnectionError,  # builtin: OSError family raised by the socket layer
)
# Reply error codes that mean the same thing when they arrive as a generic ResponseError
# (redis-py maps only some of them to a subclass).
_RETRYABLE_PREFIXES = ("LOADING", "READONLY", "OOM", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def is_unavailable(exc: BaseException) -> bool:
    """True if `exc` means "Redis is (temporarily) not usable" rather than a bug."""
    if isinstance(exc, _RETRYABLE):
        return True
    if isinstance(exc, rex.ResponseError):
        msg = str(exc.args[0]) if exc.args else ""
        # WAIT/WAITAOF sent to a primary that a failover just turned into a replica (issue #8):
        # the next attempt reaches the new primary.
        if "cannot be used with replica instances" in msg:
            return True
        return msg.split(" ", 1)[0] in _RETRYABLE_PREFIXES
    return False


def is_full(exc: BaseException) -> bool:
    """True if `exc` (or what it wraps) is Redis refusing writes at maxmemory (`OOM`): the
    server answers, so waiting for it to answer is no wait; the caller must back off."""
    while exc is not None:
        if isinstance(exc, rex.OutOfMemoryError) or (
                isinstance(exc, rex.ResponseError) and str(exc.args[0] if exc.args else "").startswith("OOM")):
            return True
        if "OutOfMemoryError" in str(exc) or "used memory > 'maxmemory'" in str(exc):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


@contextlib.contextmanager
def unavailable_as(what: str) -> Iterator[None]:
    """Re-raise retryable Redis failures inside the block as `StoreUnavailable(what)`."""
    try:
        yield
    except StoreUnavailable:
        raise
    except BaseException as exc:  # noqa: BLE001 - filtered right below
        if is_unavailable(exc):
            raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise


async def wait_until(
    probe: Callable[[], Awaitable[object]],
    *,
    what: str,
    max_wait_s: float | None = None,
    backoff: Backoff = Backoff(),
) -> None:
    """Call `probe` until it returns without a retryable error, backing off in between.

    `max_wait_s=None` waits for ever (the pipeline's choice: never drop, just pause).
    Raises `StoreUnavailable` once `max_wait_s` has elapsed; errors a retry cannot cure
    (wrong password is *not* one of them: it surfaces as a connection error and is retried,
    with the reason in the log) propagate at once. Each retry is logged with its reason so
    a stalled worker explains itself."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            await probe()
        except Exception as exc:  # noqa: BLE001 - filtered right below
            if not (isinstance(exc, StoreUnavailable) or is_unavailable(exc)):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if attempt:
                log.info("%s available again after %.2f s (%d retries)", what,
                         time.monotonic() - start, attempt)
            return
        elapsed = time.monotonic() - start
        if max_wait_s is not None and elapsed >= max_wait_s:
            raise StoreUnavailable(f"{what} still unavailable after {elapsed:.2f} s ({reason})")
        delay = backoff.delay(attempt)
        if max_wait_s is not None:
            delay = min(delay, max(0.0, max_wait_s - elapsed))
        attempt += 1
        log.warning("%s unavailable (attempt %d, %.2f s elapsed: %s); retrying in %.3f s",
                    what, attempt, elapsed, reason, delay)
        await asyncio.sleep(delay)
