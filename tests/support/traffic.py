"""Deterministic conversation traffic for end-to-end and fault-injection tests.

`generate_traffic(n, m, seed=...)` builds N conversations x M turns (message lengths, which
sides speak, and the interleaving all drawn from the seed), `produce(...)` publishes records
to a topic keyed by conversation id (returning where each landed), and `TopicMaker` /
`pipeline_env(...)` give a test (or a module-scoped fixture, which cannot use the
function-scoped `topic_factory`) its own turns/embeddings/dead-letter topics.

Nothing here knows about the expected outputs: see `tests/support/oracle.py`.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property

from aiokafka import AIOKafkaProducer

from schemas.events import ConversationDelete, TurnEvent
from schemas.turns import TurnInput
from stream.kafka.topics import delete_topics_sync, ensure_topics_sync, run_sync

from .workers import PipelineEnv

_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "memory queue latent turn river stone cloud apple train window music garden paper light "
    "table silver orange planet coffee bridge winter summer forest ocean mountain yellow quiet "
    "market doctor engine signal number answer question history morning evening kitchen travel "
    "python stream kafka batch vector search recall the a of to and in is it you that was for on "
    "are with as his they be at one have this from or had by hot word but what some we can out "
    "other were all there when up use your how said an each she which do their time if will way "
    "Zürich naïve café 東京 ñandú emoji 🙂 punctuation, (brackets) [x] {y} \"quoted\" back\\slash"
).split()

BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
"""Event timestamps are BASE_TIME + a per-record offset, so records are byte-for-byte
reproducible from the seed."""

Record = tuple[bytes | None, bytes | None]


# --------------------------------------------------------------------------- generation


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def random_messages(rng: random.Random, *, words: tuple[int, int] = (1, 40),
                    long_words: tuple[int, int] = (100, 300), long_turn_p: float = 0.06) -> list[dict]:
    """One turn's messages: user and/or assistant, `words` long, now and then `long_words`
    (long turns make the engine close segments on their token budget, not only on turn count)."""
    def length() -> int:
        return rng.randint(*(long_words if rng.random() < long_turn_p else words))

    shape = rng.choices(["both", "user", "assistant"], weights=[6, 3, 1])[0]
    msgs = []
    if shape in ("both", "user"):
        msgs.append({"role": "user", "content": random_text(rng, length())})
    if shape in ("both", "assistant"):
        msgs.append({"role": "assistant", "content": random_text(rng, length())})
    return msgs


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    turns: tuple[TurnEvent, ...]

    @property
    def last_seq(self) -> int:
        return self.turns[-1].seq if self.turns else -1

    def turn_inputs(self) -> list[TurnInput]:
        return [t.to_turn_input() for t in self.turns]


@dataclass(frozen=True)
class Traffic:
    """Conversations plus the order their turns are published in (per-conversation order is
    kept; conversations are interleaved the way live chats arrive)."""

    conversations: tuple[Conversation, ...]
    order: tuple[tuple[str, int], ...]  # (conversation_id, index into its turns), publish order
    seed: int
    tag: str = ""  # identifies the generator call (used to cache offline results)

    @cached_property
    def by_id(self) -> dict[str, Conversation]:
        return {c.conversation_id: c for c in self.conversations}

    @property
    def conversation_ids(self) -> list[str]:
        return [c.conversation_id for c in self.conversations]

    def events(self) -> list[TurnEvent]:
        """Every turn event, in publish order."""
        return [self.by_id[cid].turns[i] for cid, i in self.order]

    def records(self) -> list[Record]:
        """(key, value) per turn, in publish order, exactly as a well-behaved producer sends them."""
        return [encode(ev) for ev in self.events()]

    def keys(self) -> set[tuple[str, int]]:
        """Every (conversation_id, seq) that must get an embedding."""
        return {(c.conversation_id, t.seq) for c in self.conversations for t in c.turns}

    def turn_inputs(self) -> dict[str, list[TurnInput]]:
        return {c.conversation_id: c.turn_inputs() for c in self.conversations}

    def __len__(self) -> int:
        return len(self.order)


def generate_traffic(n_conversations: int, n_turns: int | tuple[int, int], *, seed: int = 0,
                     prefix: str = "conv", tenant: str | None = None, words: tuple[int, int] = (1, 40),
                     long_words: tuple[int, int] = (100, 300), long_turn_p: float = 0.06) -> Traffic:
    """N conversations with `n_turns` turns each (or a seeded count in the inclusive range
    `(lo, hi)`), seqs 0.., interleaved by a seeded random merge. Same arguments -> same bytes.
    Conversation ids are `<prefix>-<seed>-<index>`."""
    rng = random.Random(f"traffic:{seed}:{n_conversations}:{n_turns}:{prefix}")
    convs = []
    stamp = 0
    for i in range(n_conversations):
        cid = f"{prefix}-{seed}-{i:03d}"
        count = n_turns if isinstance(n_turns, int) else rng.randint(*n_turns)
        turns = []
        for seq in range(count):
            stamp += 1
            turns.append(TurnEvent(conversation_id=cid, seq=seq, messages=random_messages(
                rng, words=words, long_words=long_words, long_turn_p=long_turn_p),
                                   timestamp=BASE_TIME + timedelta(seconds=stamp), tenant=tenant))
        convs.append(Conversation(cid, tuple(turns)))
    return Traffic(tuple(convs), interleave([len(c.turns) for c in convs], rng,
                                            [c.conversation_id for c in convs]),
                   seed, tag=f"{seed}:{n_conversations}:{n_turns}:{prefix}:{tenant}:{words}:{long_words}:{long_turn_p}")


def interleave(counts: Sequence[int], rng: random.Random, ids: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """A random merge of the conversations' turn sequences (each kept in order): the next
    record comes from a conversation chosen with probability proportional to what it has left."""
    left = list(counts)
    nxt = [0] * len(counts)
    out = []
    while any(left):
        k = rng.choices(range(len(counts)), weights=left)[0]
        out.append((ids[k], nxt[k]))
        nxt[k] += 1
        left[k] -= 1
    return tuple(out)


def encode(event: TurnEvent | ConversationDelete) -> tuple[bytes, bytes]:
    return event.conversation_id.encode("utf-8"), event.model_dump_json().encode("utf-8")


def turn_record(cid: str, seq: int, messages: list[dict] | str, *, stamp: int = 0) -> tuple[bytes, bytes]:
    """A valid turn record; `messages` may be a plain string (one user message)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return encode(TurnEvent(conversation_id=cid, seq=seq, messages=messages,
                            timestamp=BASE_TIME + timedelta(seconds=stamp)))


def delete_record(cid: str, seq: int | None = None) -> tuple[bytes, bytes]:
    return encode(ConversationDelete(conversation_id=cid, seq=seq, timestamp=BASE_TIME))


# --------------------------------------------------------------------------- producing


@dataclass(frozen=True)
class Produced:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


async def produce_async(bootstrap: str, topic: str, records: Iterable[Record]) -> list[Produced]:
    """Publish in order (one producer, so per-partition order is the given order) and wait
    until the broker acknowledged every record. Returns where each record landed."""
    records = list(records)
    # Large enough for the oversized records the bad-input tests send on purpose.
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                            max_request_size=8 * 1024 * 1024)
    await prod.start()
    try:
        futures = [await prod.send(topic, value, key=key) for key, value in records]
        metas = [await f for f in futures]
    finally:
        await prod.stop()
    return [Produced(k, v, m.partition, m.offset) for (k, v), m in zip(records, metas)]


def produce(bootstrap: str, topic: str, records: Iterable[Record]) -> list[Produced]:
    return run_sync(lambda: produce_async(bootstrap, topic, records))


# --------------------------------------------------------------------------- topics / env


class TopicMaker:
    """Like conftest's `topic_factory`, for fixtures of any scope: `make(partitions)` creates
    a uniquely named topic; `close()` deletes them (best effort)."""

    def __init__(self, bootstrap: str, base: str):
        self.bootstrap = bootstrap
        self.base = re.sub(r"[^A-Za-z0-9._-]+", "-", base)[:100]
        self.created: list[str] = []

    def __call__(self, partitions: int = 1, *, name: str | None = None) -> str:
        topic = name or f"test.{self.base}.{uuid.uuid4().hex[:8]}"
        counts = ensure_topics_sync(self.bootstrap, {topic: partitions})
        if counts[topic] != partitions:
            raise AssertionError(f"topic {topic} has {counts[topic]} partitions, wanted {partitions}")
        self.created.append(topic)
        return topic

    def close(self) -> None:
        try:
            delete_topics_sync(self.bootstrap, self.created)
        except Exception as exc:  # noqa: BLE001 - cleanup must not turn a pass into an error
            warnings.warn(f"could not delete test topics {self.created}: {exc!r}", stacklevel=1)
        self.created = []


def pipeline_env(make_topic: Callable[..., str], kafka_bootstrap: str, redis_url: str, *,
                 partitions: int = 4, extra: dict[str, str] | None = None) -> PipelineEnv:
    """A PipelineEnv on fresh topics (turns and embeddings with `partitions`, dead letters 1)
    with a unique group and Redis namespace."""
    return PipelineEnv(
        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url,
        turns_topic=make_topic(partitions), embeddings_topic=make_topic(partitions),
        dead_letter_topic=make_topic(1), partitions=partitions, extra=dict(extra or {}),
    )


@dataclass
class Workers:
    """The worker processes a test started, stopped (SIGTERM, then SIGKILL) at the end."""

    procs: list = field(default_factory=list)

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def logs(self, n: int = 80) -> str:
        return "\n".join(f"----- worker {p.name} ({p.log_path}) -----\n{p.tail(n)}" for p in self.procs)

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every live worker at once, then wait; SIGKILL whatever is left."""
        live = [p for p in self.procs if p.alive()]
        for p in live:
            try:
                os.killpg(p.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
