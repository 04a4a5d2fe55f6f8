"""Durability before acknowledgement (issue #7, item 5), against real Redis processes that the
test starts, kills with SIGKILL and restarts on the same data directory.

What a SIGKILL can and cannot show: a killed process leaves what it had `write()`-en in the
kernel's page cache, so with `appendonly yes` a plain kill loses nothing whatever
`appendfsync` says; the fsync window only opens on a machine crash or a replica failover,
which cannot be injected here. What the tests do show:

* with the durable setting on (`aof`: WAITAOF, i.e. the commit is fsynced before the batch is
  acknowledged), a Redis killed right after a batch returned has every committed turn,
  under `appendfsync everysec` and `always`;
* a Redis that does not persist (no AOF) loses every acknowledged checkpoint on a kill — the
  failure the durable setting exists to prevent — and the durable setting refuses to start on
  such a server instead of acknowledging what it cannot keep.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stream.state.errors import UnsafeRedisConfig
from devtools.localstack import RedisServer
from stream.settings import Durability
from tests.support.oracle import TOL, compute_expected
from tests.test_production_faults import Harness, turn_input, turn_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVS = [f"d{i}" for i in range(4)]


async def _stream(h: Harness, batches: int) -> None:
    for b in range(batches):
        await h.feed(*[(cid, turn_value(cid, b)) for cid in CONVS])


def _survivors(url: str, ns: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        h = Harness(url, ns)
        try:
            got = await h.store.load_many(CONVS)
            return {cid: v.seq for cid, v in got.items()}
        finally:
            await h.close()

    return asyncio.run(go())


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
def test_durable_commits_survive_sigkill(tmp_path: Path, appendfsync: str) -> None:
    server = RedisServer(tmp_path / appendfsync, appendfsync=appendfsync)
    server.start()
    try:
        async def go() -> None:
            h = Harness(server.url, "dur", redis_durability=Durability.AOF)
            try:
                assert (await h.store.server.check_server())["aof_enabled"] == "1"
                await _stream(h, 5)
            finally:
                await h.close()

        asyncio.run(go())
        server.kill()  # right after the last batch was acknowledged
        server.start()
        assert _survivors(server.url, "dur") == {cid: 4 for cid in CONVS}
        # and the state is the exact one, not just the seq
        async def states() -> None:
            h = Harness(server.url, "dur")
            try:
                exp = compute_expected({c: [turn_input(c, s) for s in range(5)] for c in CONVS})
                for cid in CONVS:
                    got = await h.store.load(cid)
                    assert got is not None and got.state.equals(exp.states[cid], atol=TOL)
            finally:
                await h.close()

        asyncio.run(states())
    finally:
        server.stop()


def test_a_redis_without_persistence_loses_acknowledged_turns_and_durable_mode_refuses_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "none", appendonly=False)
    server.start()
    try:
        async def go() -> None:
            h = Harness(server.url, "dur")  # durability=reply: acknowledged on Redis' reply
            try:
                await _stream(h, 3)
            finally:
                await h.close()
            durable = Harness(server.url, "dur", redis_durability=Durability.AOF)
            try:
                with pytest.raises(UnsafeRedisConfig, match="appendonly off"):
                    await durable.store.server.check_server()
            finally:
                await durable.close()

        asyncio.run(go())
        server.kill()
        server.start()
        # every acknowledged turn is gone: the next turns would start from empty memories
        assert _survivors(server.url, "dur") == {cid: -1 for cid in CONVS}
    finally:
        server.stop()
