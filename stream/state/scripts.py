"""The Lua scripts of the memory-state store (stream/state/lua/*.lua) and how they are sent.

Every script but `view.lua` is sent with `view.lua` prepended: the load, commit and end scripts
compute "where a writer starts from" the same way, so a writer's expectation can be compared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from stream.state.availability import StoreUnavailable, is_unavailable, unavailable_as
from stream.state.durability import DurabilityPolicy
from stream.state.errors import MemoryStateError

log = logging.getLogger(__name__)

LUA_DIR = Path(__file__).resolve().parent / "lua"

# Status codes of commit.lua (first element of its reply).
APPLIED, STALE, FINGERPRINT, ALREADY_APPLIED, CORRUPT = 1, 0, 2, 3, 4


@cache
def lua(name: str) -> str:
    """The text of `lua/<name>.lua`, with the view function in front of it."""
    body = (LUA_DIR / f"{name}.lua").read_text()
    return body if name == "view" else (LUA_DIR / "view.lua").read_text() + body


class ScriptRunner:
    """Sends script calls in one pipeline round trip, reloading a script the server forgot."""

    def __init__(self, redis: Redis, durability: DurabilityPolicy, where: str) -> None:
        self.redis = redis
        self.durability = durability
        self.where = where
        self.commit = redis.register_script(lua("commit"))
        self.load = redis.register_script(lua("load"))
        self.end = redis.register_script(lua("end"))
        self.hold = redis.register_script(lua("hold"))

    async def run(self, script: AsyncScript, calls: list[tuple[Sequence[str], Sequence[bytes]]],
                  what: str, *, durable: bool = False,
                  also: list[tuple[AsyncScript, Sequence[str], Sequence[Any]]] = ()) -> list[Any]:
        """EVALSHA `script` once per call in ONE pipeline round trip; `also`: calls of other
        scripts riding in the same pipeline after them (their replies are appended).

        redis-py's own script-in-pipeline support adds a SCRIPT EXISTS round trip to every
        execute; instead we send EVALSHA blind and, only for the calls answered NOSCRIPT (the
        server restarted or its script cache was flushed; those calls did not run), load the
        script and resend them. `durable`: end the pipeline with the durability wait."""
        items = [(script, keys, args) for keys, args in calls] + list(also)
        out: list[Any] = [None] * len(items)
        pending = list(range(len(items)))
        tail = self.durability.tail() if durable else []
        for _ in range(3):
            with unavailable_as(f"{what} on {self.where}"):
                pipe = self.redis.pipeline(transaction=False)
                for i in pending:
                    sc, keys, args = items[i]
                    pipe.evalsha(sc.sha, len(keys), *keys, *args)
                for cmd in tail:
                    pipe.execute_command(*cmd)
                replies = await pipe.execute(raise_on_error=False)
            if tail:
                self.durability.check(replies[len(pending):])
                replies = replies[: len(pending)]
            missing = []
            for i, reply in zip(pending, replies):
                if isinstance(reply, rex.NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    if is_unavailable(reply):
                        raise StoreUnavailable(f"{what} on {self.where}: {reply}") from reply
                    raise MemoryStateError(f"{what} failed: {reply}") from reply
                else:
                    out[i] = reply
            if not missing:
                return out
            log.warning("%s: script not in the server's cache (restart or SCRIPT FLUSH); "
                        "loading it and resending %d call(s)", self.where, len(missing))
            with unavailable_as(f"SCRIPT LOAD on {self.where}"):
                for sc in {id(items[i][0]): items[i][0] for i in missing}.values():
                    sc.sha = await self.redis.script_load(sc.script)
            pending = missing
        raise MemoryStateError(f"{what}: script kept disappearing from {self.where}")

    async def load_all(self) -> None:
        """Load the scripts into the server's cache up front (so the first batch does not
        pay, and log, a NOSCRIPT round trip)."""
        with unavailable_as(f"SCRIPT LOAD on {self.where}"):
            for script in (self.commit, self.load, self.end, self.hold):
                script.sha = await self.redis.script_load(script.script)
