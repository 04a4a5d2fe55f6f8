"""`evostream produce` on files of any size: read the JSONL lazily, keep memory constant, show
rate and time left.

Why a window instead of the whole file: interleaving conversations the way live traffic
arrives (turn 0 of many chats, then turn 1 of each ...) would need every conversation in
memory at once (100k records took 218 MB). Here at most `window` conversations are open at a
time; when one has sent its last turn, the next conversation of the file takes its place. Each
conversation's turns still go out in order under its own key; ready-made turn events in the
file are passed through in file order. In-flight sends are bounded too (`max_in_flight`), so a
slow broker applies back-pressure instead of piling futures up.

Progress is measured in bytes of the file read (known up front without a pre-pass), shown by
tqdm with the records/s rate and the estimated time left; it writes to stderr only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator

from schemas.events import TurnEvent

if TYPE_CHECKING:
    from stream.kafka.security import KafkaSecurity


class InputError(ValueError):
    """A line of the input file is neither a conversation nor a turn event."""


def _conversation_turns(conv: dict[str, Any]) -> Iterator[TurnEvent]:
    cid, tenant = conv["conversation_id"], conv.get("tenant")
    for seq, t in enumerate(conv["turns"]):
        msgs = []
        if t.get("user") is not None:
            msgs.append({"role": "user", "content": t["user"]})
        if t.get("assistant") is not None:
            msgs.append({"role": "assistant", "content": t["assistant"]})
        yield TurnEvent(conversation_id=cid, seq=seq, messages=msgs, timestamp=datetime.now(timezone.utc),
                        tenant=tenant)


def iter_file_records(fh: IO[bytes], *, window: int = 256, name: str = "input") -> Iterator[tuple[bytes, bytes]]:
    """(key, value) records of a JSONL stream, with at most `window` conversations open."""
    open_convs: deque[Iterator[TurnEvent]] = deque()
    lineno = 0
    exhausted = False

    def next_line() -> tuple[bytes, bytes] | dict | None:
        nonlocal lineno, exhausted
        for raw in fh:
            lineno += 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise InputError(f"{name}:{lineno}: not JSON: {exc}") from None
            if isinstance(obj, dict) and obj.get("type") == "turn":
                return (str(obj["conversation_id"]).encode(), raw.rstrip(b"\r\n"))
            if isinstance(obj, dict) and "turns" in obj and "conversation_id" in obj:
                return obj
            raise InputError(f"{name}:{lineno}: neither a conversation (with 'turns') nor a turn event")
        exhausted = True
        return None

    while True:
        # fill the window; pass ready-made turn events straight through
        while not exhausted and len(open_convs) < window:
            item = next_line()
            if item is None:
                break
            if isinstance(item, tuple):
                yield item
            else:
                open_convs.append(_conversation_turns(item))
        if not open_convs:
            return
        # one round: the next turn of every open conversation
        for _ in range(len(open_convs)):
            it = open_convs.popleft()
            ev = next(it, None)
            if ev is None:
                continue
            yield ev.conversation_id.encode(), ev.model_dump_json().encode()
            open_convs.append(it)


class _Progress:
    """tqdm over the bytes of the file, with records and records/s in the postfix."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.bar = None
        self.records = 0
        self.t0 = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="produce", dynamic_ncols=True,
                            mininterval=0.5)

    def update(self, pos: int) -> None:
        self.records += 1
        if self.bar is not None and (self.records % 200 == 0):
            self.bar.update(pos - self.bar.n)
            rate = self.records / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(f"{self.records} records, {rate:,.0f} rec/s", refresh=False)

    def close(self, pos: int) -> None:
        if self.bar is not None:
            self.bar.update(pos - self.bar.n)
            rate = self.records / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(f"{self.records} records, {rate:,.0f} rec/s")
            self.bar.close()


async def produce_stream(path: Path, *, bootstrap: str, topic: str, rate: float = 0.0, progress: bool = True,
                         security: KafkaSecurity | None = None, idempotent: bool = False, window: int = 256,
                         max_in_flight: int = 10_000) -> int:
    """Send every record of `path` to `topic`; returns the count. Waits for every delivery."""
    prod = await start_producer(bootstrap, security=security, idempotent=idempotent)
    n = 0
    with open(path, "rb") as fh:
        bar = _Progress(path.stat().st_size, progress)
        try:
            in_flight: deque[asyncio.Future] = deque()
            t0 = time.monotonic()
            for key, value in iter_file_records(fh, window=window, name=str(path)):
                in_flight.append(await prod.send(topic, value, key=key))
                n += 1
                while len(in_flight) > max_in_flight:
                    await in_flight.popleft()
                if rate > 0:
                    delay = t0 + n / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                bar.update(fh.tell())
            while in_flight:
                await in_flight.popleft()
            bar.close(fh.tell())
        finally:
            await prod.stop()
    return n


def count_records(path: Path, window: int = 256) -> int:
    """How many records `produce` would send (reads the file once, constant memory)."""
    with open(path, "rb") as fh:
        return sum(1 for _ in iter_file_records(fh, window=window, name=str(path)))


__all__ = ["InputError", "count_records", "iter_file_records", "produce_stream"]


async def start_producer(bootstrap: str, *, security: Any = None, idempotent: bool = False) -> Any:
    """A started AIOKafkaProducer for the tools' producers (acks=all, a short linger); a
    failed start stops the half-open client before raising."""
    from aiokafka import AIOKafkaProducer

    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=idempotent,
                            **(security.client_kwargs() if security is not None else {}))
    try:
        await prod.start()
    except BaseException:
        await prod.stop()
        raise
    return prod
