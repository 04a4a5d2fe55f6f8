"""A TCP proxy between Redis clients and one Redis server that can hold the reply to the
durability wait (`WAITAOF` / `WAIT`), for the durability-before-acknowledgement proof.

Why a proxy: a SIGKILL of Redis cannot expose a missing fsync (the kernel's page cache keeps
what was written), so "the commit waits until its writes are durable" can only be proven by
making the durability confirmation *late* and watching what the worker does meanwhile. The
proxy reads the RESP protocol in both directions: it notes the name of every command a client
sends, and matches each reply to its command in order (Redis answers a connection's commands
in the order it received them, pipelined or not). While `hold()` is on, the reply to a held
command, and everything after it on that connection, waits in the proxy until `release()`.
Redis itself has run the command (and every write before it): only the client does not know
yet that they are durable. Every other command passes untouched.

Runs its own event loop in a daemon thread (like tests/support/kafka_proxy.py); `close()`
stops it (use as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

from devtools.localstack import HOST
from tests.support.loop_proxy import LoopProxy

HELD_BY_DEFAULT = frozenset({b"WAITAOF", b"WAIT"})


class ProtocolError(ValueError):
    """Bytes that are not RESP (the proxy then just forwards; matching stops for that connection)."""


def reply_end(buf: bytes | bytearray, i: int = 0) -> int | None:
    """Index just past the complete RESP2/RESP3 value starting at `buf[i]`, or None if more
    bytes are needed."""
    if i >= len(buf):
        return None
    crlf = buf.find(b"\r\n", i)
    if crlf < 0:
        return None
    kind, line = buf[i:i + 1], buf[i + 1:crlf]
    after = crlf + 2
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return after
    if kind not in (b"$", b"!", b"=", b"*", b"~", b">", b"%", b"|"):
        raise ProtocolError(f"unknown RESP type byte {kind!r}")
    try:
        n = int(line)
    except ValueError as exc:
        raise ProtocolError(f"bad length {bytes(line)[:20]!r} after {kind!r}") from exc
    if kind in (b"$", b"!", b"="):  # bulk string, blob error, verbatim string
        if n < 0:
            return after
        end = after + n + 2
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):  # array, set, push, map, attribute
        count = 2 * n if kind in (b"%", b"|") else n
        pos = after
        for _ in range(max(count, 0)):
            nxt = reply_end(buf, pos)
            if nxt is None:
                return None
            pos = nxt
        if kind == b"|":  # an attribute precedes the value it describes
            return reply_end(buf, pos)
        return pos
    raise AssertionError("unreachable")


def command_name(buf: bytes | bytearray, i: int = 0) -> tuple[bytes, int] | None:
    """(upper-cased command name, end index) of the complete command at `buf[i]`, or None if
    more bytes are needed. Clients send commands as arrays of bulk strings; an inline command
    (a bare line, as telnet sends) counts too."""
    if i >= len(buf):
        return None
    if buf[i:i + 1] != b"*":
        crlf = buf.find(b"\r\n", i)
        if crlf < 0:
            return None
        words = bytes(buf[i:crlf]).split()
        return (words[0].upper() if words else b""), crlf + 2
    end = reply_end(buf, i)
    if end is None:
        return None
    crlf = buf.find(b"\r\n", i)
    first = crlf + 2
    if buf[first:first + 1] != b"$":
        return b"", end
    crlf2 = buf.find(b"\r\n", first)
    n = int(buf[first + 1:crlf2])
    return bytes(buf[crlf2 + 2:crlf2 + 2 + n]).upper(), end


@dataclass(eq=False)
class _Conn:
    client_w: asyncio.StreamWriter
    upstream_w: asyncio.StreamWriter | None = None
    pending: deque = field(default_factory=deque)  # names of commands sent, awaiting their reply
    broken: bool = False  # unparseable traffic: forwarded as is, no matching

    def close(self) -> None:
        for w in (self.client_w, self.upstream_w):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort()


class RedisProxy(LoopProxy):
    """Forward 127.0.0.1:`port` to the Redis on `upstream_port`; `hold()` delays the replies to
    the commands in `held_commands` (default WAITAOF and WAIT) until `release()`."""

    name = "redis-proxy"

    def __init__(self, upstream_port: int, port: int | None = None, *,
                 held_commands: frozenset[bytes] = HELD_BY_DEFAULT) -> None:
        super().__init__(upstream_port, port)
        self.held_commands = frozenset(c.upper() for c in held_commands)
        self.commands: Counter[str] = Counter()   # command name -> times sent through the proxy
        self.held_replies = 0                      # replies that waited for release()
        self._held_now = 0
        self._holding = False
        self._released: asyncio.Event | None = None
        self._held_event = threading.Event()       # set while at least one reply is held

    # -- lifecycle (the rest in LoopProxy) --------------------------------------------------
    async def _start(self) -> None:
        self._released = asyncio.Event()
        self._released.set()
        await super()._start()

    def _before_close(self) -> None:
        self.release()

    async def _close(self) -> None:
        await super()._close()
        # let the connection handlers see their closed sockets and finish (no task is left
        # pending when the loop stops)
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    # -- control --------------------------------------------------------------------------
    def hold(self) -> None:
        """From now on, replies to the held commands wait in the proxy."""
        async def go() -> None:
            self._holding = True
            assert self._released is not None
            self._released.clear()
        self._call(go())

    def release(self) -> None:
        """Let every held reply (and what queued behind it) through; stop holding."""
        async def go() -> None:
            self._holding = False
            assert self._released is not None
            self._released.set()
        self._call(go())

    @property
    def holding_now(self) -> int:
        """Replies waiting in the proxy right now."""
        return self._held_now

    def wait_held(self, timeout: float) -> bool:
        """True once a reply is being held (False after `timeout` seconds)."""
        return self._held_event.wait(timeout)

    # -- data path ------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Conn(writer)
        try:
            up_r, up_w = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            c.close()
            return
        c.upstream_w = up_w
        self.conns.add(c)
        await asyncio.gather(self._requests(c, reader, up_w), self._replies(c, up_r, writer),
                             return_exceptions=True)
        c.close()
        self.conns.discard(c)

    async def _requests(self, c: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        buf = bytearray()
        try:
            while data := await src.read(65536):
                if not c.broken:
                    buf += data
                    try:
                        while (got := command_name(buf)) is not None:
                            name, end = got
                            c.pending.append(name)
                            self.commands[name.decode("ascii", "replace")] += 1
                            del buf[:end]
                            if name in (b"SYNC", b"PSYNC"):
                                # a replica's link: an RDB payload and a command stream follow,
                                # not one reply per command; passed through untouched
                                c.broken = True
                                break
                    except (ProtocolError, ValueError):
                        c.broken = True
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            c.close()

    async def _replies(self, c: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        buf = bytearray()
        try:
            while data := await src.read(65536):
                if c.broken:
                    dst.write(data)
                    await dst.drain()
                    continue
                buf += data
                out = bytearray()
                try:
                    while (end := reply_end(buf)) is not None:
                        push = buf[:1] == b">"
                        name = b"" if push or not c.pending else c.pending.popleft()
                        if name in self.held_commands and self._holding:
                            # everything before the held reply goes now; the reply waits
                            if out:
                                dst.write(bytes(out))
                                await dst.drain()
                                out.clear()
                            await self._wait_release()
                        out += buf[:end]
                        del buf[:end]
                except (ProtocolError, ValueError):
                    c.broken = True
                    out += buf
                    buf.clear()
                if out:
                    dst.write(bytes(out))
                    await dst.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            c.close()

    async def _wait_release(self) -> None:
        assert self._released is not None
        self.held_replies += 1
        self._held_now += 1
        self._held_event.set()
        try:
            await self._released.wait()
        finally:
            self._held_now -= 1
            if not self._held_now:
                self._held_event.clear()
