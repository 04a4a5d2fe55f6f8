"""Replay conversations into the turns topic (the `evostream produce` command and the demo).

Input is JSON lines, either one conversation per line
    {"conversation_id": "c1", "tenant": "acme", "turns": [{"user": "...", "assistant": "..."}, ...]}
or one ready-made turn event per line ({"type": "turn", ...}, sent as is). Conversations are
interleaved round-robin, the way live traffic from many chats arrives, each keyed by its
conversation id so that its turns stay in order on one partition.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from stream.clients.produce_stream import start_producer

from schemas.events import TurnEvent

if TYPE_CHECKING:
    from stream.clients.produce_stream import ProduceResult
    from stream.kafka.security import KafkaSecurity


def turn_events(conversations: list[dict]) -> Iterator[TurnEvent]:
    iters = []
    for conv in conversations:
        cid = conv["conversation_id"]
        msgs_per_turn = []
        for t in conv["turns"]:
            msgs = []
            if t.get("user") is not None:
                msgs.append({"role": "user", "content": t["user"]})
            if t.get("assistant") is not None:
                msgs.append({"role": "assistant", "content": t["assistant"]})
            msgs_per_turn.append(msgs)
        iters.append((cid, conv.get("tenant"), iter(enumerate(msgs_per_turn))))
    while iters:
        nxt = []
        for cid, tenant, it in iters:
            item = next(it, None)
            if item is None:
                continue
            seq, msgs = item
            yield TurnEvent(conversation_id=cid, seq=seq, messages=msgs, timestamp=datetime.now(timezone.utc), tenant=tenant)
            nxt.append((cid, tenant, it))
        iters = nxt


def read_records(path: Path) -> list[tuple[bytes, bytes]]:
    convs, raw = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if obj.get("type") == "turn":
            raw.append((str(obj["conversation_id"]).encode(), line.encode()))
        elif "turns" in obj:
            convs.append(obj)
        else:
            raise ValueError(f"{path}:{lineno}: neither a conversation (with 'turns') nor a turn event")
    out = [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in turn_events(convs)]
    return out + raw


async def produce_records(records: list[tuple[bytes, bytes]], *, bootstrap: str, topic: str, rate: float = 0.0,
                          progress: bool = True, security: KafkaSecurity | None = None,
                          idempotent: bool = False) -> int:
    prod = await start_producer(bootstrap, security=security, idempotent=idempotent)
    try:
        t0 = time.monotonic()
        futs = []
        for i, (key, value) in enumerate(records, 1):
            futs.append(await prod.send(topic, value, key=key))
            if rate > 0:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    import asyncio

                    await asyncio.sleep(delay)
            if progress and (i % 100 == 0 or i == len(records)):
                print(f"\rproduced {i}/{len(records)}", end="", file=sys.stderr, flush=True)
        for f in futs:
            await f
        if progress:
            print(file=sys.stderr)
        return len(records)
    finally:
        await prod.stop()


async def produce_file(path: Path, *, bootstrap: str, topic: str, rate: float = 0.0, progress: bool = True,
                       security: KafkaSecurity | None = None, idempotent: bool = False) -> ProduceResult:
    """Stream `path` to the topic in constant memory, with a rate/ETA progress bar (issue #11:
    stream/clients/produce_stream.py); `read_records` + `produce_records` remain for in-memory
    callers. Interrupted, it returns what was delivered (`ProduceResult.interrupted`)."""
    from stream.clients.produce_stream import produce_stream

    return await produce_stream(path, bootstrap=bootstrap, topic=topic, rate=rate, progress=progress,
                                security=security, idempotent=idempotent)
