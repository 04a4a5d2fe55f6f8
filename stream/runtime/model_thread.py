"""The one thread that owns the model, shared by ingestion steps and query passes.

Why one thread: the model (and its device) is not safe to drive from two threads, and on a GPU
two streams of work would only contend. Why a wrapper instead of a bare ThreadPoolExecutor:
the query side must know whether ingestion is busy to apply its fairness rule
(stream/api/batcher.py), so this executor keeps two ledgers: everything submitted through the
standard `Executor.submit` (what `loop.run_in_executor` calls, i.e. the pipeline's steps) is
*ingestion*; `submit_query` is the query side. Both run FIFO on the same single thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ModelThread(Executor):
    def __init__(self, thread_name_prefix: str = "evo-model"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._lock = threading.Lock()
        self.ingest_pending = 0          # submitted and not finished (queued or running)
        self.ingest_busy_s = 0.0         # model-thread seconds spent on ingestion
        self.query_busy_s = 0.0          # ... on queries
        self.last_ingest_end = float("-inf")  # time.monotonic()
        self.query_passes = 0            # query passes started on the thread (tests count interleaving)

    # -- ingestion (the standard Executor interface) --------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            self.ingest_pending += 1

        def run() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.ingest_pending -= 1
                    self.ingest_busy_s += dt
                    self.last_ingest_end = time.monotonic()

        try:
            return self._pool.submit(run)
        except BaseException:
            with self._lock:
                self.ingest_pending -= 1
            raise

    # -- queries --------------------------------------------------------------------------
    def submit_query(self, fn: Callable[..., T], /, *args: Any) -> Future[tuple[T, float]]:
        """Run a query pass; the future's result is (fn's result, seconds it ran)."""

        def run() -> tuple[T, float]:
            with self._lock:
                self.query_passes += 1
            t0 = time.perf_counter()
            try:
                out = fn(*args)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.query_busy_s += dt
            return out, dt

        return self._pool.submit(run)

    def ingestion_busy(self, grace_s: float) -> bool:
        """A step is queued or running, or one ended less than `grace_s` ago (the gap between
        two steps of a backlog, while the pipeline checkpoints and emits, is not idleness)."""
        with self._lock:
            return self.ingest_pending > 0 or time.monotonic() - self.last_ingest_end < grace_s

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
