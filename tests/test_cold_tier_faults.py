"""A corrupted cold tier quarantines the conversations it holds, never the worker (issue #17 item 2).

Reproduced on the local stack as an operator would meet it: conversations frozen to the cold
tier, the file(s) then overwritten. Before the fix the next turn of a frozen conversation exited
the worker with 70 (`database disk image is malformed`) and a restarted worker exited 70 within
seconds (`file is not a database`): every partition stopped. Now the frozen conversations' turns
are dead-lettered `checkpoint_corrupt` naming the unreadable file, other conversations go on, and
a restarted worker starts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest
import torch

from schemas.events import DeadLetterReason
from stream.state.cold_tier import ColdTier
from stream.state.store import MemoryStore
from tests.support.oracle import read_dead_letters, wait_for_embeddings
from tests.support.traffic import TopicMaker, Workers, pipeline_env, produce, turn_record
from tests.support.workers import WorkerProc

FROZEN = ("frozen-a", "frozen-b")


def _overwrite_cold_files(path: Path) -> list[Path]:
    """Write garbage over every SQLite file of the cold tier (one file, or a directory of shards)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.sqlite"))
    for f in files:
        f.write_bytes(b"not a database, overwritten by hand " * 400)
    return files


async def _freeze_all(redis_url: str, namespace: str, cold_path: Path) -> int:
    cold = ColdTier(cold_path)
    store = MemoryStore(redis_url, fingerprint="cold-tier", hidden_size=1, capacity=1, dtype=torch.float32,
                            namespace=namespace, cold=cold)
    try:
        return (await cold.freeze_idle(store, 0)).frozen
    finally:
        await store.close()
        cold.close()


def _dead_letters_for(penv, keys: set[tuple[str, int]], timeout: float, worker: WorkerProc) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = {}
        for dl in read_dead_letters(penv.kafka_bootstrap, penv.dead_letter_topic):
            ev = json.loads(base64.b64decode(dl.original_value_b64))
            if (ev["conversation_id"], ev["seq"]) in keys:
                got[(ev["conversation_id"], ev["seq"])] = dl
        if set(got) == keys:
            return got
        if not worker.alive():
            raise AssertionError(f"worker exited (rc={worker.proc.returncode}); log:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"dead letters for {sorted(keys - set(got))} not seen in {timeout}s")
        time.sleep(1.0)


@pytest.mark.slow  # a worker, a freeze and a corruption: about a minute (tests/test_cold_store.py has the logic)
def test_a_corrupt_cold_tier_quarantines_its_conversations_and_the_worker_goes_on(
        kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    topics = TopicMaker(kafka_bootstrap, "cold-corrupt")
    procs = Workers()
    cold_path = tmp_path / "cold.sqlite"
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2,
                            extra={"EVOSTREAM_COLD_TIER_PATH": str(cold_path)})
        worker = procs.add(WorkerProc(penv, tmp_path, "cold").start())
        produce(kafka_bootstrap, penv.turns_topic, [turn_record(c, i, f"turn {i} of {c}") for c in FROZEN for i in range(3)])
        wait_for_embeddings(penv, {(c, i) for c in FROZEN for i in range(3)}, timeout=300, workers=[worker])
        assert asyncio.run(_freeze_all(redis_url, penv.namespace, cold_path)) == 2
        assert _overwrite_cold_files(cold_path)

        # the next turn of a frozen conversation, next to a conversation that never was frozen
        produce(kafka_bootstrap, penv.turns_topic,
                [turn_record("frozen-a", 3, "after the corruption"), turn_record("fresh", 0, "hello"),
                 turn_record("fresh", 1, "still here")])
        letters = _dead_letters_for(penv, {("frozen-a", 3)}, timeout=120, worker=worker)
        dl = letters[("frozen-a", 3)]
        assert dl.reason_code is DeadLetterReason.CHECKPOINT_CORRUPT
        assert "cold" in dl.reason and "unreadable" in dl.reason, dl.reason
        wait_for_embeddings(penv, {("fresh", 0), ("fresh", 1)}, timeout=180, workers=[worker])
        assert worker.alive()

    finally:
        procs.stop_all()
        topics.close()


@pytest.mark.slow  # two worker starts: about a minute
def test_a_worker_starts_with_a_corrupt_cold_tier_and_quarantines_only_its_conversations(
        kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    """The restart half: a worker whose cold tier is already overwritten must start (before the
    fix: exit 70 within seconds, `file is not a database`) and process everything else."""
    topics = TopicMaker(kafka_bootstrap, "cold-restart")
    procs = Workers()
    cold_path = tmp_path / "cold.sqlite"
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2,
                            extra={"EVOSTREAM_COLD_TIER_PATH": str(cold_path)})
        produce(kafka_bootstrap, penv.turns_topic, [turn_record(c, i, f"turn {i} of {c}") for c in FROZEN for i in range(2)])
        first = procs.add(WorkerProc(penv, tmp_path, "first").start())
        wait_for_embeddings(penv, {(c, i) for c in FROZEN for i in range(2)}, timeout=300, workers=[first])
        first.stop()
        assert asyncio.run(_freeze_all(redis_url, penv.namespace, cold_path)) == 2
        assert _overwrite_cold_files(cold_path)
        worker = procs.add(WorkerProc(penv, tmp_path, "restarted").start())
        worker.wait_ready(timeout=180)
        produce(kafka_bootstrap, penv.turns_topic,
                [turn_record("frozen-b", 2, "after the restart"), turn_record("fresh", 0, "hello")])
        letters = _dead_letters_for(penv, {("frozen-b", 2)}, timeout=180, worker=worker)
        assert letters[("frozen-b", 2)].reason_code is DeadLetterReason.CHECKPOINT_CORRUPT
        assert "unreadable" in letters[("frozen-b", 2)].reason
        wait_for_embeddings(penv, {("fresh", 0)}, timeout=180, workers=[worker])
        assert worker.alive()
    finally:
        procs.stop_all()
        topics.close()
