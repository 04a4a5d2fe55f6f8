"""A TCP proxy between Kafka clients and a broker that the test controls, per client process.

Why per process: a Kafka client connects to whatever address the broker *advertises*, not to
its bootstrap address. So the broker under test (`ProxiedBroker`) listens on one port and
advertises the proxy's; every client then talks through the proxy, and the proxy tells
connections apart by the process that owns the client socket (looked up in /proc, Linux
only). That lets a test partition ONE worker from Kafka while Redis, the other workers and
the test's own producer/consumer keep working, without losing the broker's in-memory data.

Faults (for everyone with `set_mode`, or for some processes with `partition`):

* ``cut``: close the connections and refuse new ones (accept + close at once), as a broker
  that is down or a firewall that rejects;
* ``blackhole``: keep the sockets, forward nothing either way (a hung broker or a network that
  drops packets). Healing closes those connections (a real partition ends with timed-out,
  reset connections; a Kafka stream that lost requests cannot resume in place);
* ``slow``: forward, each chunk delayed by `delay_s`;
* ``drop_produce``: forward everything except Produce requests (Kafka API key 0), which are
  swallowed: a worker that still consumes and checkpoints but cannot deliver its output.
  Healing closes the connections that lost requests.

Runs its own event loop in a daemon thread; `close()` stops it (use as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from devtools.localstack import HOST, TansuBroker, free_ports
from tests.support.loop_proxy import LoopProxy

MODES = ("pass", "cut", "blackhole", "slow", "drop_produce")
PRODUCE_API_KEY = 0


def socket_owner(peer_port: int, server_port: int, pids: Iterable[int]) -> int | None:
    """PID (among `pids`) whose socket is the client end 127.0.0.1:peer_port -> :server_port."""
    inode = None
    try:
        with open("/proc/net/tcp") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                local, remote = parts[1], parts[2]
                if int(local.rsplit(":", 1)[1], 16) == peer_port and int(remote.rsplit(":", 1)[1], 16) == server_port:
                    inode = parts[9]
                    break
    except OSError:
        return None
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        return pid
        except OSError:
            continue
    return None


@dataclass(eq=False)
class _Conn:
    peer_port: int
    client_w: asyncio.StreamWriter
    upstream_w: asyncio.StreamWriter | None = None
    owner: int | None = None
    blackholed: bool = False
    dropped: int = 0          # requests swallowed by drop_produce
    tasks: list[asyncio.Task] = field(default_factory=list)

    def close(self) -> None:
        for w in (self.client_w, self.upstream_w):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort()


class KafkaProxy(LoopProxy):
    """Forward 127.0.0.1:`port` to `upstream_port`, with faults per client process."""

    name = "kafka-proxy"

    def __init__(self, upstream_port: int, port: int | None = None, *, delay_s: float = 0.5):
        super().__init__(upstream_port, port)
        self.delay_s = delay_s
        self.mode = "pass"
        self.rules: dict[int, str] = {}     # pid -> mode
        self.watched: set[int] = set()      # pids whose connections we attribute
        self.accepted = 0
        self.refused = 0
        self.dropped_produce = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    # -- control --------------------------------------------------------------------------
    def watch(self, pid: int) -> None:
        """Attribute connections of process `pid` (call right after starting it)."""
        self._call(self._set(lambda: self.watched.add(pid)))

    def set_mode(self, mode: str) -> None:
        """Fault for every client without a rule of its own."""
        assert mode in MODES, mode
        self._call(self._set(lambda: setattr(self, "mode", mode)))

    def partition(self, pid: int, mode: str = "blackhole") -> None:
        """Fault for one client process (a worker cut off from Kafka)."""
        assert mode in MODES, mode
        self.watched.add(pid)
        self._call(self._set(lambda: self.rules.__setitem__(pid, mode)))

    def heal(self, pid: int | None = None) -> None:
        """End the fault of `pid` (or every fault: global mode back to pass)."""
        def change() -> None:
            if pid is None:
                self.rules.clear()
                self.mode = "pass"
            else:
                self.rules.pop(pid, None)
        self._call(self._set(change))

    async def _set(self, change) -> None:
        change()
        for c in list(self.conns):
            if c.owner is None and self.watched:
                c.owner = socket_owner(c.peer_port, self.port, self.watched)
            mode = self._mode_for(c)
            if mode == "cut" or (c.blackholed and mode != "blackhole") or (c.dropped and mode != "drop_produce"):
                c.close()
                self.conns.discard(c)
            elif mode == "blackhole":
                c.blackholed = True

    def _mode_for(self, c: _Conn) -> str:
        if c.owner is not None and c.owner in self.rules:
            return self.rules[c.owner]
        return self.mode

    def connections(self, pid: int | None = None) -> int:
        return sum(1 for c in list(self.conns) if pid is None or c.owner == pid)

    # -- data path ------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_port = writer.get_extra_info("peername")[1]
        c = _Conn(peer_port, writer)
        if self.watched:
            c.owner = socket_owner(peer_port, self.port, self.watched)
        mode = self._mode_for(c)
        if mode == "cut":
            self.refused += 1
            c.close()
            return
        self.accepted += 1
        self.conns.add(c)
        c.blackholed = mode == "blackhole"
        try:
            up_r, up_w = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            c.close()
            self.conns.discard(c)
            return
        c.upstream_w = up_w
        c.tasks = [asyncio.ensure_future(self._pump(c, reader, up_w, requests=True)),
                   asyncio.ensure_future(self._pump(c, up_r, writer))]
        await asyncio.gather(*c.tasks, return_exceptions=True)
        c.close()
        self.conns.discard(c)

    async def _pump(self, c: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *,
                    requests: bool = False) -> None:
        """Copy src -> dst. The client->broker direction (`requests`) is cut into Kafka request
        frames (int32 size + body; the body starts with the int16 API key) so that single
        requests can be dropped."""
        buf = b""
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                mode = self._mode_for(c)
                if c.blackholed or mode == "blackhole":
                    c.blackholed = True
                    continue  # swallowed
                if mode == "slow":
                    await asyncio.sleep(self.delay_s)
                if requests:
                    buf += data
                    out = []
                    while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                        n = 4 + int.from_bytes(buf[:4], "big")
                        frame, buf = buf[:n], buf[n:]
                        api_key = int.from_bytes(frame[4:6], "big", signed=True) if n >= 6 else -1
                        if mode == "drop_produce" and api_key == PRODUCE_API_KEY:
                            c.dropped += 1
                            self.dropped_produce += 1
                            continue
                        out.append(frame)
                    data = b"".join(out)
                    if not data:
                        continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            c.close()


class ProxiedBroker(TansuBroker):
    """A dedicated tansu broker that advertises a proxy's address: every client that
    bootstraps through the proxy keeps talking through it."""

    def __init__(self, run_dir: Path, *, advertised_port: int, **kw) -> None:
        super().__init__(run_dir, **kw)
        self.advertised_port = advertised_port

    def command(self) -> list[str]:
        argv = super().command()
        i = argv.index("--advertised-listener-url")
        argv[i + 1] = f"tcp://{HOST}:{self.advertised_port}"
        return argv

    @property
    def bootstrap(self) -> str:
        # readiness and clients go through the advertised (proxy) address
        return f"{HOST}:{self.advertised_port}"


@contextlib.contextmanager
def proxied_broker(run_dir: Path):
    """(broker, proxy): a fresh tansu broker behind a KafkaProxy; both stopped afterwards.
    Clients use `proxy.address`."""
    broker_port, proxy_port = free_ports(2)
    proxy = KafkaProxy(broker_port, proxy_port).start()
    broker = ProxiedBroker(run_dir, port=broker_port, advertised_port=proxy_port, die_with_parent=True)
    try:
        broker.start()
        yield broker, proxy
    finally:
        with contextlib.suppress(Exception):
            broker.resume()
        broker.stop(grace=2.0)
        proxy.close()


def wait(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """`workers.wait_for`, polling twice as often (broker faults are short)."""
    from .workers import wait_for

    return wait_for(predicate, timeout, interval=interval, what=what)
