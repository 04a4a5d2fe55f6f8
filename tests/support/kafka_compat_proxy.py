"""A loopback TCP pass-through in front of the local broker, for librdkafka clients (kcat).

Why it exists (measured 2026-11-30): Debian's kcat 1.7.1 links librdkafka 2.0.2, which cannot
parse the ApiVersions v3 response of the packaged tansu broker ("Protocol read buffer underflow
for ApiVersion v3 at 274/279"), so it never gets past the first request; without ApiVersions
(`api.version.request=false` with an old `broker.version.fallback`) it speaks protocol
versions tansu does not answer. Kafka defines the way out (KIP-511): a broker answers an
ApiVersions request of a version it does not support with UNSUPPORTED_VERSION and a v0 body
listing the versions it does, and the client retries with one of those. This proxy gives that
answer to librdkafka's ApiVersions requests of version >= 3 and forwards every other byte
unchanged (other clients' ApiVersions included), both
ways: produce, fetch, metadata, group and offset traffic are tansu's own. The broker must
advertise the proxy's address, so that clients reconnect through it.
"""

from __future__ import annotations

import asyncio
import struct
import threading

API_VERSIONS = 18
UNSUPPORTED_VERSION = 35
MAX_FORWARDED_API_VERSIONS = 2


def _unsupported_api_versions_response(correlation_id: int) -> bytes:
    # ApiVersions response v0 (header v0): correlation id, error code, [api_key, min, max]
    body = struct.pack(">ihi", correlation_id, UNSUPPORTED_VERSION, 1) + struct.pack(
        ">hhh", API_VERSIONS, 0, MAX_FORWARDED_API_VERSIONS)
    return struct.pack(">i", len(body)) + body


class KafkaCompatProxy:
    """`start()` listens on `port` (127.0.0.1) and forwards to `upstream_port`; runs its own
    event loop in a thread so it serves synchronous tests too. `downgraded` counts the
    ApiVersions requests answered with UNSUPPORTED_VERSION."""

    def __init__(self, port: int, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.downgraded = 0
        self.forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kafka-compat-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> "KafkaCompatProxy":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, self.host, self.port), self._loop)
        self._server = fut.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        write_lock = asyncio.Lock()

        async def client_to_broker() -> None:
            while True:
                head = await reader.readexactly(4)
                (size,) = struct.unpack(">i", head)
                frame = await reader.readexactly(size)
                api_key, api_version, correlation_id = struct.unpack(">hhi", frame[:8])
                # Only librdkafka needs it (its ApiVersions v3 request names the client
                # software); aiokafka and the rest reach tansu untouched.
                if api_key == API_VERSIONS and api_version > MAX_FORWARDED_API_VERSIONS and b"librdkafka" in frame:
                    self.downgraded += 1
                    async with write_lock:
                        writer.write(_unsupported_api_versions_response(correlation_id))
                        await writer.drain()
                    continue
                self.forwarded += 1
                up_writer.write(head + frame)
                await up_writer.drain()

        async def broker_to_client() -> None:
            while True:
                data = await up_reader.read(65536)
                if not data:
                    return
                async with write_lock:
                    writer.write(data)
                    await writer.drain()

        tasks = [asyncio.ensure_future(client_to_broker()), asyncio.ensure_future(broker_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
