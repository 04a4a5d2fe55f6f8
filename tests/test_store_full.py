"""Issue #17 item 5, in-process: a Redis that answers but refuses writes (full at maxmemory with
`noeviction`) is retried at a bounded rate, the batch is held (nothing lost), and the pause says
why. Before: every refused commit was retried at once after a ping that always answered:
thousands of commands a second (tests/test_store_loss.py measures the same through a worker
process, behind `slow`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support.pipeline_harness import Harness, run
from tests.support.store_faults import own_redis

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_full_store_is_retried_at_a_bounded_rate_and_nothing_is_lost(tmp_path: Path) -> None:
    with own_redis(tmp_path) as r:

        async def go() -> None:
            h = Harness(r.url, "full", store_retry_backoff_max_s=2.0)
            try:
                await h.turns("f1", [0, 1])
                r.fill()
                task = asyncio.create_task(h.turns("f1", [2, 3]))
                await asyncio.sleep(1.5)  # past the first, quick retries
                c0, t0 = r.commands_processed(), time.monotonic()
                await asyncio.sleep(4.0)
                rate = (r.commands_processed() - c0) / (time.monotonic() - t0)
                print(f"while full: {rate:.1f} commands/s")
                assert not task.done() and h.pipeline.paused and h.pipeline.guard.reason == "full"
                # the ceiling is 2 s between retries; each retry is a pipeline + a ping
                assert rate < 10, f"{rate:.0f} commands/s at a full Redis"
                r.unfill()
                await asyncio.wait_for(task, 30)
                assert sorted(e.seq for e in h.emitter.embeddings()) == [0, 1, 2, 3]
                assert not h.pipeline.paused
            finally:
                await h.close()

        run(go())
