"""`evostream produce` on files of any size: read the JSONL lazily, keep memory constant, show
rate and time left.

Why a window instead of the whole file: interleaving conversations the way live traffic
arrives (turn 0 of many chats, then turn 1 of each ...) would need every conversation in
memory at once (100k records took 218 MB). Here at most `window` conversations are open at a
time; when one has sent its last turn, the next conversation of the file takes its place. Each
conversation's turns still go out in order under its own key; ready-made turn events in the
file are passed through in file order. In-flight sends are bounded too (`max_in_flight`), so a
slow broker applies back-pressure instead of piling futures up.

Progress is counted in records delivered out of the file's total (counted by a quick first
read of the file when progress is shown), by tqdm with the rate and the time left, on stderr
only. (It used to count bytes of the file read: with conversations interleaved the whole window
is read before the first record goes out, so the bar sat at 0% until the end -- issue #18.)

Interrupted (Ctrl-C), the producer stops sending, waits for what is in flight, and the result
says how many records reached the topic, so the caller can tell the user (issue #18).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass
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
    """tqdm over the records delivered, out of the file's total."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rec", desc="produce", dynamic_ncols=True, mininterval=0.5)

    def delivered(self, n: int) -> None:
        if self.bar is not None and n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class ProduceResult:
    """What a produce did: records handed to the producer, records the broker acknowledged,
    the file's total (None when not counted), and whether it was interrupted."""

    sent: int
    delivered: int
    total: int | None
    interrupted: bool = False


async def produce_stream(path: Path, *, bootstrap: str, topic: str, rate: float = 0.0, progress: bool = True,
                         security: KafkaSecurity | None = None, idempotent: bool = False, window: int = 256,
                         max_in_flight: int = 10_000) -> ProduceResult:
    """Send every record of `path` to `topic` and wait for every delivery. Cancelled (Ctrl-C
    under asyncio.run), it stops sending, flushes what is in flight and returns with
    `interrupted` set instead of raising, so the caller can say what reached the topic."""
    total = quick_count(path) if progress else None
    prod = await start_producer(bootstrap, security=security, idempotent=idempotent)
    sent = 0
    delivered = 0
    bar = _Progress(total, progress)

    def done(fut: asyncio.Future) -> None:
        nonlocal delivered
        if not fut.cancelled() and fut.exception() is None:
            delivered += 1
            bar.delivered(delivered)

    # A Ctrl-C can land inside the Kafka client (its start's connection retries, a send waiting
    # for metadata or buffer room), which catches the cancel: nothing raises, but the task stays
    # marked as cancelling. That still means stop, so it is checked after every await.
    task = asyncio.current_task()

    def cancel_requested() -> bool:
        return bool(task is not None and task.cancelling())

    interrupted = cancel_requested()
    try:
        if interrupted:
            return ProduceResult(sent=0, delivered=0, total=total, interrupted=True)
        with open(path, "rb") as fh:
            in_flight: deque[asyncio.Future] = deque()
            t0 = time.monotonic()
            try:
                for key, value in iter_file_records(fh, window=window, name=str(path)):
                    fut = await prod.send(topic, value, key=key)
                    fut.add_done_callback(done)
                    in_flight.append(fut)
                    sent += 1
                    while len(in_flight) > max_in_flight:
                        await in_flight.popleft()
                    if rate > 0:
                        delay = t0 + sent / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    if cancel_requested():
                        interrupted = True
                        break
                while in_flight:
                    await in_flight.popleft()
                interrupted = interrupted or cancel_requested()
            except asyncio.CancelledError:
                interrupted = True  # Ctrl-C: the flush below decides what was delivered
    finally:
        try:
            await prod.stop()  # sends and waits for what is in flight
            await asyncio.sleep(0)  # the delivery callbacks of the last futures run: `delivered` is final
        finally:
            bar.close()
    return ProduceResult(sent=sent, delivered=delivered, total=total, interrupted=interrupted)


def quick_count(path: Path) -> int:
    """The records a produce of `path` sends, counted without building them (a line that does
    not parse counts 0 here; the produce itself reports it)."""
    n = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("type") == "turn":
                n += 1
            elif isinstance(obj, dict) and isinstance(obj.get("turns"), list):
                n += len(obj["turns"])
    return n


def count_records(path: Path, window: int = 256) -> int:
    """How many records `produce` would send (reads the file once, constant memory)."""
    with open(path, "rb") as fh:
        return sum(1 for _ in iter_file_records(fh, window=window, name=str(path)))


__all__ = ["InputError", "ProduceResult", "count_records", "iter_file_records", "produce_stream", "quick_count",
           "start_consumer", "start_producer"]


async def start_consumer(**kwargs: Any) -> Any:
    """A started AIOKafkaConsumer; a failed start (broker unreachable, name not resolvable)
    stops the half-open client before raising, so nothing is left for the garbage collector
    to report as "Unclosed AIOKafkaConsumer" after the command's error line (issue #18)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**kwargs)
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


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
