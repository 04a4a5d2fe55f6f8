"""Output compression benchmark: bytes per embedding event and producer CPU per Kafka codec.

What the worker produces is almost all embedding events: ~1 KiB of JSON around a base64
float32 vector (1024-d for every released checkpoint). This measures, for each codec Kafka
defines (and none), on this machine:

- bytes per event on the wire/on disk: the record batches the producer builds (aiokafka's own
  batch builder, magic v2, the codec), for 1, 8 and 64 events per batch (a worker emits one
  batch per partition per micro-batch: a few events per batch at low load, tens under load);
- producer CPU per event: process CPU time of producing N events through the real local
  broker with that codec (the compression cost plus the same client overhead for all);
- consumer CPU per event: process CPU time of reading them back (what an indexer pays).

Codecs are run interleaved (none, gzip, ..., then again) and the median of the rounds is kept,
so load from other processes on a shared machine hits every codec alike.

Run:  .venv/bin/python -m benchmarks.bench_codecs  [--events 2000 --rounds 3 --dim 1024]
Writes/updates the "Output compression" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.record.default_records import DefaultRecordBatchBuilder  # noqa: E402

from benchmarks.report import update_section  # noqa: E402
from schemas.events import EmbeddingEvent, SourceRef, StageTimings  # noqa: E402
from schemas.vectors import encode_vector  # noqa: E402
from devtools.localstack import LocalStack  # noqa: E402
from stream.kafka.topics import ensure_topics_sync  # noqa: E402

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
_CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
BATCH_SIZES = (1, 8, 64)


def make_events(n: int, dim: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) of n realistic embedding events (unit vectors, as the model emits)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        vec = rng.standard_normal(dim).astype(np.float32)
        vec /= np.linalg.norm(vec)
        cid = f"conv-{uuid.UUID(int=int(rng.integers(0, 2**63))).hex[:16]}"
        ev = EmbeddingEvent(conversation_id=cid, seq=i % 500, vector=encode_vector(vec), dim=dim,
                            model="evoembedding-2b", checkpoint="sha256:3f9a1c0e2b7d4e11", memory_len=min(512, 16 * i),
                            tenant="acme", source=SourceRef(topic="evostream.turns", partition=i % 8, offset=10_000 + i),
                            timings=StageTimings(queue_ms=12.5, step_ms=40.25, checkpoint_ms=1.75),
                            produced_at=datetime.now(UTC))
        out.append((cid.encode(), ev.model_dump_json().encode()))
    return out


def batch_bytes(events: list[tuple[bytes, bytes]], codec: str, per_batch: int) -> float:
    """Mean bytes per event in record batches of `per_batch` events built with `codec`."""
    total = 0
    for start in range(0, len(events), per_batch):
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=_CODEC_IDS[codec], is_transactional=0,
                                            producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                            batch_size=64 * 1024 * 1024)
        for off, (key, value) in enumerate(events[start:start + per_batch]):
            builder.append(off, timestamp=None, key=key, value=value, headers=[])
        total += len(builder.build())
    return total / len(events)


async def produce_cpu(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]], codec: str) -> float:
    """Process CPU seconds to produce `events` with `codec` (acks=all, waiting for each)."""
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                            compression_type=None if codec == "none" else codec, max_request_size=16 * 1024 * 1024)
    await prod.start()
    try:
        c0 = time.process_time()
        futs = [await prod.send(topic, value, key=key) for key, value in events]
        for f in futs:
            await f
        return time.process_time() - c0
    finally:
        await prod.stop()


async def consume_cpu(bootstrap: str, topic: str, expected: int) -> float:
    cons = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await cons.start()
    try:
        tp = TopicPartition(topic, 0)
        cons.assign([tp])
        await cons.seek_to_beginning(tp)
        c0 = time.process_time()
        got = 0
        while got < expected:
            batch = await cons.getmany(timeout_ms=2000)
            if not batch:
                raise RuntimeError(f"read back {got}/{expected} records of {topic}")
            got += sum(len(v) for v in batch.values())
        return time.process_time() - c0
    finally:
        await cons.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    events = make_events(args.events, args.dim)
    raw = sum(len(k) + len(v) for k, v in events) / len(events)
    sizes = {c: {b: batch_bytes(events, c, b) for b in BATCH_SIZES} for c in CODECS}

    prod_cpu: dict[str, list[float]] = {c: [] for c in CODECS}
    cons_cpu: dict[str, list[float]] = {c: [] for c in CODECS}
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp), with_redis=False, die_with_parent=True)
        stack.start()
        try:
            bs = stack.kafka_bootstrap
            for _ in range(args.rounds):
                for codec in CODECS:
                    topic = f"bench.codecs.{codec}.{uuid.uuid4().hex[:6]}"
                    ensure_topics_sync(bs, {topic: 1})
                    prod_cpu[codec].append(asyncio.run(produce_cpu(bs, topic, events, codec)))
                    cons_cpu[codec].append(asyncio.run(consume_cpu(bs, topic, len(events))))
        finally:
            stack.stop()

    us = lambda xs: statistics.median(xs) / args.events * 1e6  # noqa: E731
    rows = ["| codec | bytes/event, 1 per batch | 8 per batch | 64 per batch | vs none (8/batch) "
            "| producer CPU µs/event | consumer CPU µs/event |",
            "|---|---|---|---|---|---|---|"]
    for c in CODECS:
        s = sizes[c]
        rows.append(f"| {c} | {s[1]:,.0f} | {s[8]:,.0f} | {s[64]:,.0f} | {s[8] / sizes['none'][8]:.2f}x "
                    f"| {us(prod_cpu[c]):,.0f} | {us(cons_cpu[c]):,.0f} |")
    # The default: fewest bytes among the codecs that cost at most 1.5x the producer CPU of none.
    cheap = [c for c in CODECS if us(prod_cpu[c]) <= 1.5 * us(prod_cpu["none"])]
    best = min(cheap, key=lambda c: sizes[c][8])
    choice = (f"Choice (`EVOSTREAM_OUTPUT_COMPRESSION` default): **{best}** -- the fewest bytes among the codecs "
              f"within 1.5x the producer CPU of none: {sizes[best][8]:,.0f} vs {sizes['none'][8]:,.0f} B per event "
              f"at 8 events per batch ({1 - sizes[best][8] / sizes['none'][8]:.0%} fewer) for "
              f"{us(prod_cpu[best]) - us(prod_cpu['none']):+,.0f} µs producer CPU per event.")
    body = "\n".join([
        f"Command: `.venv/bin/python -m benchmarks.bench_codecs --events {args.events} --rounds {args.rounds} "
        f"--dim {args.dim}` (whole run {time.monotonic() - t_start:.0f} s)",
        "",
        f"- machine: {platform.platform()} ({platform.machine()}), Python {platform.python_version()}, "
        f"aiokafka with cramjam; local broker tansu; date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- events: {args.events} embedding events, {args.dim}-d float32 unit vectors (random: their mantissas "
        f"are as incompressible as a real model's), {raw:,.0f} B of key+JSON each",
        "- bytes: record batches as the producer builds them (aiokafka's batch builder, magic v2); "
        "CPU: process time of producing through the broker (acks=all) and of reading back, "
        f"median of {args.rounds} interleaved rounds, per event",
        "",
        *rows,
        "",
        choice,
    ])
    print(body)
    if not args.no_write:
        update_section(REPO / "BENCHMARKS.md", "Output compression (embeddings and dead-letter topics)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
