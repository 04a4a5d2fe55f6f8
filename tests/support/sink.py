"""Helpers of the sink tests (issue #19): synthetic embeddings-topic traffic shaped like the
worker's (generations, tombstones in both forms, tenants sharing conversation ids, the
emitter's resent suffixes), an INDEPENDENT reduction of a topic to the rows it must leave in
the index, and `SinkProc`, a real `evostream sink` subprocess to SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from schemas.events import (
    OUTBOUND_EVENT_ADAPTER,
    ConversationDeleted,
    EmbeddingEvent,
    MemoryOrigin,
    SourceRef,
    StageTimings,
)
from schemas.vectors import decode_vector, encode_vector
from stream.kafka.connect import HEADER_TENANT, HEADER_TYPE

from .workers import REPO

T0 = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
Rec = tuple[bytes, bytes | None, list[tuple[str, bytes]]]   # key, value, headers


def embedding(cid: str, seq: int, *, gen: int = 1, memory: str = "continued", tenant: str | None = None,
              dim: int = 8, seed: int | None = None, checkpoint: str = "ck") -> EmbeddingEvent:
    rng = np.random.default_rng(seed if seed is not None else hash((tenant, cid, gen, seq)) % 2**32)
    return EmbeddingEvent(conversation_id=cid, seq=seq, vector=encode_vector(rng.standard_normal(dim).astype(np.float32)),
                          dim=dim, model="m", checkpoint=checkpoint, memory_len=seq, memory=MemoryOrigin(memory),
                          generation=gen, tenant=tenant, source=SourceRef(topic="turns", partition=0, offset=seq),
                          timings=StageTimings(queue_ms=7.0, step_ms=1.0, checkpoint_ms=0.0),
                          produced_at=T0 + timedelta(seconds=seq))


def tombstone(cid: str, tenant: str | None, through: int | None, *, null: bool = False) -> Rec:
    if null:
        headers = [(HEADER_TYPE, b"conversation_deleted")] + ([(HEADER_TENANT, tenant.encode())] if tenant else [])
        return cid.encode(), None, headers
    ev = ConversationDeleted(conversation_id=cid, deleted_through_seq=through, at=T0, tenant=tenant)
    return cid.encode(), ev.model_dump_json().encode(), []


def synthetic_traffic(conversations: int, turns: int, *, seed: int, dim: int = 8,
                      tenants: tuple[str | None, ...] = (None, "acme")) -> list[Rec]:
    """Records in the order the worker could have emitted them: per conversation (the same ids
    in each tenant) its turns, sometimes a new generation (after an expiry: seqs go on; after
    a delete: a tombstone, event or null record, then seqs from 0), sometimes the emitter's
    resend of a suffix of the conversation's last records; conversations interleaved."""
    rng = random.Random(seed)
    streams: list[list[Rec]] = []
    for t in tenants:
        for c in range(conversations):
            cid = f"conv-{c}"
            out: list[Rec] = []
            gen, seq, first = 1, 0, True
            for _ in range(turns):
                roll = rng.random()
                memory = "new" if first else "continued"
                if not first and roll < 0.08:   # expiry: a new generation, seqs continue
                    gen, memory = gen + 1, "reset_after_expiry"
                elif not first and roll < 0.14:  # delete, then a new life from seq 0
                    out.append(tombstone(cid, t, seq - 1, null=rng.random() < 0.5))
                    gen, seq, memory = gen + 1, 0, "reset_after_delete"
                ev = embedding(cid, seq, gen=gen, memory=memory, tenant=t, dim=dim, seed=rng.randrange(2**32))
                out.append((cid.encode(), ev.model_dump_json().encode(), []))
                seq, first = seq + 1, False
                if rng.random() < 0.05:          # the emitter resent a suffix (a failed send)
                    out.extend(out[-rng.randint(1, min(4, len(out))):])
            if rng.random() < 0.15:
                out.append(tombstone(cid, t, seq - 1, null=rng.random() < 0.5))
            streams.append(out)
    merged: list[Rec] = []
    cursors = [0] * len(streams)
    live = [i for i, s in enumerate(streams) if s]
    while live:
        i = rng.choice(live)
        merged.append(streams[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(streams[i]):
            live.remove(i)
    return merged


def expected_rows(messages: list) -> dict[tuple[str, str, int, int], np.ndarray]:
    """What the index must hold after `messages` (aiokafka records of the embeddings topic,
    in partition order), reduced one record at a time -- written apart from the sink's own
    planner, so that a bug in one does not hide in the other."""
    convs: dict[tuple[str, str], dict[tuple[int, int], np.ndarray]] = {}
    for m in messages:
        if m.value is None:
            tenant = dict(m.headers or ()).get(HEADER_TENANT)
            convs[((tenant or b"").decode(), m.key.decode())] = {}
            continue
        ev = OUTBOUND_EVENT_ADAPTER.validate_json(m.value)
        key = (ev.tenant or "", ev.conversation_id)
        if isinstance(ev, ConversationDeleted):
            convs[key] = {}
            continue
        rows = convs.setdefault(key, {})
        if ev.memory is not MemoryOrigin.CONTINUED:
            rows.clear()
        elif any(g > ev.generation for g, _ in rows):
            continue
        else:
            for k in [k for k in rows if k[0] < ev.generation]:
                del rows[k]
        rows[(ev.generation, ev.seq)] = decode_vector(ev.vector)
    return {(t, c, g, s): v for (t, c), rows in convs.items() for (g, s), v in rows.items()}


def table_of(rows: list) -> dict[tuple[str, str, int, int], np.ndarray]:
    return {r.key: r.vector for r in rows}


def differences(got: dict, want: dict) -> list[str]:
    """Missing rows, extra rows, rows whose vector differs (bit for bit)."""
    out = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    out += [f"extra {k}" for k in sorted(got.keys() - want.keys())]
    out += [f"vector differs {k}" for k in sorted(want.keys() & got.keys())
            if not np.array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32))]
    return out


@dataclass
class SinkProc:
    """`evostream sink` as a subprocess of the test (its own process group)."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    def start(self) -> "SinkProc":
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOSTREAM_")}
        env.update(self.env, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "sink", *self.args], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._log.close()
        return rc

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f}s (last: {str(last)[:300]})")


class SinkLedger:
    """The sink as one more ledger of a chaos scenario (tests/test_chaos.py): a real `evostream
    sink` runs beside the workers while faults land, is itself SIGKILLed once at a random moment
    and restarted, and at the end its PostgreSQL table is compared with the embeddings topic."""

    def __init__(self, target, penv, log_dir: Path):
        self.target = target
        self.topic = penv.embeddings_topic
        self.bootstrap = penv.kafka_bootstrap
        self.env = {"EVOSTREAM_KAFKA_BOOTSTRAP": penv.kafka_bootstrap, "EVOSTREAM_EMBEDDINGS_TOPIC": self.topic,
                    "EVOSTREAM_TURNS_TOPIC": penv.turns_topic, "EVOSTREAM_SINK_BATCH_MAX": "50", **target.env()}
        self.log = log_dir / "sink.log"
        self.proc: SinkProc | None = None
        self.kills = 0

    def start(self) -> "SinkLedger":
        self.proc = SinkProc(self.env, self.log).start()
        return self

    def kill_and_restart(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.kills += 1
        self.start()

    def poll(self) -> None:
        if self.proc is not None and not self.proc.alive():
            raise AssertionError(f"the sink exited on its own:\n{self.proc.tail()}")

    def finish(self, timeout: float) -> dict:
        """Wait until the sink has committed the whole topic, stop it, compare. Returns the
        summary numbers; `problems` is empty when the table equals the topic."""
        from stream.index.pgvector import PgVectorIndex

        from .workers import read_topic_sync

        msgs = read_topic_sync(self.bootstrap, self.topic)
        ends: dict = {}
        for m in msgs:
            ends[(self.topic, m.partition)] = m.offset + 1
        with PgVectorIndex(self.target.dsn, schema=self.target.schema) as idx:
            try:
                wait_for(lambda: {k: v for k, v in idx.offsets("evostream-sink").items() if k[0] == self.topic} == ends,
                         timeout, "the sink at the end of the embeddings topic", interval=0.5)
            finally:
                if self.proc is not None:
                    self.proc.stop()
            got = table_of(idx.rows())
        want = expected_rows(msgs)
        diff = differences(got, want)
        return {"rows": len(got), "kills": self.kills, "missing": sum(d.startswith("missing") for d in diff),
                "extra": sum(d.startswith("extra") for d in diff),
                "vector_differs": sum(d.startswith("vector") for d in diff),
                "problems": [f"sink table: {d}" for d in diff[:20]]}
