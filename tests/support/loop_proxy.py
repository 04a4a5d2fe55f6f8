"""A TCP proxy on an event loop of its own thread: the lifecycle the fault proxies share
(tests/support/kafka_proxy.py, tests/support/redis_proxy.py). Each subclass says how a
connection is forwarded (`_handle`); this says how the proxy starts, is called from the test's
thread, and stops with every connection closed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from devtools.localstack import HOST, free_ports


class LoopProxy:
    """Listen on 127.0.0.1:`port` (a free one by default) for a server on `upstream_port`."""

    name = "proxy"

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_ports(1)[0]
        self.conns: set[Any] = set()   # the subclass's connection records, each with close()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)

    def start(self):
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _before_close(self) -> None:
        """Called from the test's thread before the connections close (e.g. release what is held)."""

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._before_close()
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            c.close()
        self.conns.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro, timeout: float = 10.0):
        """Run `coro` on the proxy's loop from the test's thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
