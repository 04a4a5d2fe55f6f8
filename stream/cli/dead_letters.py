"""`evostream dead-letters list|show|replay`: read the dead-letter topic, and send a record
back to the turns topic once its cause is fixed.

A dead letter is named by its position in the dead-letter topic, `PARTITION:OFFSET` (shown by
`list`). `replay` sends the original key and either the original value unchanged (the cause
was on our side: a fixed model, a raised limit) or a corrected value from a file (the cause
was the record), to the topic it came from. The worker then treats it like any turn: applied
if its seq is new, skipped as a duplicate otherwise, so replaying twice is harmless.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional

import typer

from stream.cli.base import app, note
from stream.cli.core import _kafka_call, settings
from stream.cli.errors import CliError, ExitCode

dl_app = typer.Typer(help="List, show and replay dead letters (records the workers could not process).",
                     no_args_is_help=True)


def _parse_id(letter_id: str) -> tuple[int, int]:
    try:
        p, o = letter_id.split(":")
        return int(p), int(o)
    except ValueError:
        raise CliError(f"dead letter id {letter_id!r} is not PARTITION:OFFSET (see `evostream dead-letters list`)",
                       ExitCode.USAGE) from None


async def read_dead_letters(s: Any, *, only: tuple[int, int] | None = None) -> list[tuple[int, int, Any]]:
    """Every record of the dead-letter topic (or just `only`), as (partition, offset, event or
    the raw text when it does not parse)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas.events import DeadLetterEvent
    from stream.index.sink import TopicNotFound
    from stream.kafka.security import KafkaSecurity

    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=max(4 * 1024 * 1024, 4 * s.max_record_bytes),
                         fetch_max_bytes=max(16 * 1024 * 1024, 8 * s.max_record_bytes),
                         **KafkaSecurity.from_settings(s).client_kwargs())
    await c.start()
    out: list[tuple[int, int, Any]] = []
    try:
        if s.dead_letter_topic not in await c.topics():  # by listing: a named lookup auto-creates on tansu
            raise TopicNotFound(f"topic {s.dead_letter_topic!r} does not exist on the broker at {s.kafka_bootstrap}")
        parts = sorted(c.partitions_for_topic(s.dead_letter_topic) or ())
        tps = [TopicPartition(s.dead_letter_topic, p) for p in parts if only is None or p == only[0]]
        if not tps:
            return out
        c.assign(tps)
        ends = await c.end_offsets(tps)
        for tp in tps:
            if only is not None:
                if only[1] >= ends[tp]:
                    return out
                c.seek(tp, only[1])
            else:
                await c.seek_to_beginning(tp)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            batch = await c.getmany(*pending, timeout_ms=1000)
            for tp, msgs in batch.items():
                for m in msgs:
                    if only is not None and m.offset != only[1]:
                        continue
                    try:
                        ev: Any = DeadLetterEvent.model_validate_json(m.value or b"")
                    except ValueError:
                        ev = (m.value or b"").decode("utf-8", errors="replace")
                    out.append((tp.partition, m.offset, ev))
                    if only is not None:
                        return out
            for tp in list(pending):
                if await c.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await c.stop()
    return out


def _summary(p: int, o: int, ev: Any) -> str:
    if isinstance(ev, str):
        return f"{p}:{o}  (unparseable dead letter) {ev[:80]!r}"
    key = ev.original_key()
    return (f"{p}:{o}  {ev.failed_at.isoformat() if hasattr(ev.failed_at, 'isoformat') else ev.failed_at}  "
            f"{ev.reason_code.value:<18} {ev.topic}/{ev.partition}@{ev.offset}  "
            f"key={key.decode('utf-8', 'replace') if key is not None else None!r}  {ev.reason[:120]}")


@dl_app.command("list")
def list_cmd(reason: Optional[str] = typer.Option(None, "--reason", help="only this reason code (e.g. key_mismatch)"),
             limit: int = typer.Option(100, "--limit", min=1, help="show at most the last N")) -> None:
    """One line per dead letter: ID (PARTITION:OFFSET), when, reason code, where it came from,
    its key and the reason."""
    s = settings()
    letters = _kafka_call(s, lambda: asyncio.run(read_dead_letters(s)))
    if reason:
        letters = [x for x in letters if not isinstance(x[2], str) and x[2].reason_code.value == reason]
    for p, o, ev in letters[-limit:]:
        print(_summary(p, o, ev))
    note(f"{len(letters)} dead letter(s) in {s.dead_letter_topic}" + (f" with reason {reason}" if reason else ""))


def _one(s: Any, letter_id: str) -> Any:
    p, o = _parse_id(letter_id)
    got = _kafka_call(s, lambda: asyncio.run(read_dead_letters(s, only=(p, o))))
    if not got:
        raise CliError(f"no dead letter {letter_id} in {s.dead_letter_topic}", ExitCode.FAILED)
    ev = got[0][2]
    if isinstance(ev, str):
        raise CliError(f"dead letter {letter_id} is not a dead-letter event: {ev[:200]!r}", ExitCode.FAILED)
    return ev


@dl_app.command("show")
def show_cmd(letter_id: str = typer.Argument(..., metavar="ID", help="PARTITION:OFFSET from `list`")) -> None:
    """The whole dead letter as JSON, with the original key and value decoded when they are text."""
    s = settings()
    ev = _one(s, letter_id)
    out = json.loads(ev.model_dump_json())
    for what, raw in (("original_key", ev.original_key()), ("original_value", ev.original_value())):
        if raw is not None:
            try:
                out[what] = raw.decode("utf-8")
            except UnicodeDecodeError:
                out[what] = None  # binary: only the base64 form is meaningful
    print(json.dumps(out, indent=2, ensure_ascii=False))


@dl_app.command("replay")
def replay_cmd(letter_id: str = typer.Argument(..., metavar="ID", help="PARTITION:OFFSET from `list`"),
               value_file: Optional[Path] = typer.Option(None, "--value-file", exists=True, dir_okay=False,
                                                         help="send this corrected value instead of the original"),
               topic: Optional[str] = typer.Option(None, "--topic",
                                                   help="default: the topic the record came from")) -> None:
    """Send a dead letter's record back to the turns topic: the original value unchanged, or
    the corrected one from --value-file. The key is the original key; when that was missing,
    the corrected value's conversation_id."""
    from aiokafka import AIOKafkaProducer

    from stream.kafka.security import KafkaSecurity

    s = settings()
    ev = _one(s, letter_id)
    if value_file is None and getattr(ev, "truncated", False):
        raise CliError(f"dead letter {letter_id} holds only a prefix of its record (it was too large for the "
                       "broker); replay it with --value-file and the whole corrected record", ExitCode.USAGE)
    value = value_file.read_bytes().strip() if value_file is not None else ev.original_value()
    if value is None:
        raise CliError(f"dead letter {letter_id} has no original value; pass --value-file", ExitCode.USAGE)
    key = ev.original_key()
    if not key:
        try:
            key = str(json.loads(value)["conversation_id"]).encode()
        except (ValueError, KeyError, TypeError):
            raise CliError(f"dead letter {letter_id} had no key and the value names no conversation_id",
                           ExitCode.USAGE) from None
    dest = topic or ev.topic

    async def send() -> tuple[int, int]:
        prod = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all",
                                max_request_size=max(1024 * 1024, len(value) + 65536),
                                **KafkaSecurity.from_settings(s).client_kwargs())
        await prod.start()
        try:
            md = await prod.send_and_wait(dest, value, key=key)
            return md.partition, md.offset
        finally:
            await prod.stop()

    part, off = _kafka_call(s, lambda: asyncio.run(send()))
    how = f"corrected value from {value_file}" if value_file else "original value unchanged"
    print(f"replayed dead letter {letter_id} ({ev.reason_code.value}) to {dest}/{part}@{off}: key "
          f"{key.decode('utf-8', 'replace')!r}, {how}")

app.add_typer(dl_app, name="dead-letters")
