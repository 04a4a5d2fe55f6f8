"""What the pipeline *should* have produced, and a checker that compares it with what it did.

Offline expectation: the engine steps each conversation alone, one turn per call, in seq order
(no batching, no Redis, no Kafka, no restarts). Whatever the streaming worker does (micro-
batches mixing conversations, state cache, checkpoint + delta replay, crashes and replays,
rebalances), every embedding event and every stored checkpoint must match it within `tol`.

    exp = expected_for(traffic)                  # or compute_expected({cid: [TurnInput...]})
    rep = check_outputs(penv, exp)               # reads the embeddings topic and Redis
    assert not rep.problems(), rep.summary()

`wait_for_embeddings(penv, keys, ...)` polls the embeddings topic until every key is there,
failing early (with the log) if a worker process died. `metrics(worker)` scrapes /metrics.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import ValidationError

from schemas.events import (
    OUTBOUND_EVENT_ADAPTER,
    ConversationDeleted,
    DeadLetterEvent,
    EmbeddingEvent,
)
from schemas.turns import TurnInput
from schemas.vectors import decode_vector
from stream.state.store import MemoryStore
from stream.kafka.topics import run_sync
from workers.state import ConversationState

from .traffic import Traffic
from .workers import PipelineEnv, WorkerProc, read_topic_sync

TOL = 1e-5

Key = tuple[str, int]

# --------------------------------------------------------------------------- the engine

_engine = None
_engine_lock = threading.Lock()


def offline_engine():
    """The tiny checkpoint the workers run by default (PipelineEnv.checkpoint == ""), loaded
    once per test process."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from workers.engine import load_engine
            from workers.tiny_checkpoint import cached_tiny_checkpoint

            _engine = load_engine(cached_tiny_checkpoint("qwen3", "tiny"))
        return _engine


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the offline model on `n` threads (leave the other core to the worker under test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- expectation


@dataclass
class Expected:
    embeddings: dict[Key, np.ndarray] = field(default_factory=dict)
    states: dict[str, ConversationState] = field(default_factory=dict)
    memory_lens: dict[Key, int] = field(default_factory=dict)  # latents the embedding saw

    def keys(self) -> set[Key]:
        return set(self.embeddings)

    def merge(self, other: Expected) -> Expected:
        return Expected({**self.embeddings, **other.embeddings}, {**self.states, **other.states},
                        {**self.memory_lens, **other.memory_lens})


def compute_expected(turns_by_cid: Mapping[str, Sequence[TurnInput]], *, engine=None,
                     threads: int = 1) -> Expected:
    """Step each conversation alone, one turn per call, in the given order."""
    engine = engine or offline_engine()
    exp = Expected()
    with torch_threads(threads):
        for cid, turns in turns_by_cid.items():
            states = {cid: engine.new_state()}
            for t in turns:
                (out,) = engine.step(states, [t])
                exp.embeddings[(cid, t.seq)] = np.asarray(out.embedding, dtype=np.float32).copy()
                exp.memory_lens[(cid, t.seq)] = out.memory_len
            exp.states[cid] = states[cid]
    return exp


_cache: dict[str, Expected] = {}


def expected_for(traffic: Traffic, *, threads: int = 1) -> Expected:
    """`compute_expected` for generated traffic, memoised per generator call."""
    key = traffic.tag or str(id(traffic))
    if key not in _cache:
        _cache[key] = compute_expected(traffic.turn_inputs(), threads=threads)
    return _cache[key]


# --------------------------------------------------------------------------- reading outputs


@dataclass
class Outputs:
    """Everything on the embeddings topic, parsed."""

    embeddings: dict[Key, list[EmbeddingEvent]] = field(default_factory=lambda: defaultdict(list))
    raw: dict[Key, list[bytes]] = field(default_factory=lambda: defaultdict(list))  # record values, as delivered
    deleted: list[ConversationDeleted] = field(default_factory=list)
    unparseable: list[bytes] = field(default_factory=list)
    keys_of_records: list[tuple[bytes | None, str]] = field(default_factory=list)  # (record key, event cid)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.embeddings.values())


def read_outputs(bootstrap: str, topic: str, *, idle_ms: int = 1500) -> Outputs:
    out = Outputs()
    for msg in read_topic_sync(bootstrap, topic, idle_ms=idle_ms):
        try:
            ev = OUTBOUND_EVENT_ADAPTER.validate_json(msg.value)
        except (ValidationError, TypeError):
            out.unparseable.append(msg.value)
            continue
        out.keys_of_records.append((msg.key, ev.conversation_id))
        if isinstance(ev, EmbeddingEvent):
            out.embeddings[(ev.conversation_id, ev.seq)].append(ev)
            out.raw[(ev.conversation_id, ev.seq)].append(bytes(msg.value))
        else:
            out.deleted.append(ev)
    return out


def read_dead_letters(bootstrap: str, topic: str) -> list[DeadLetterEvent]:
    return [DeadLetterEvent.model_validate_json(m.value) for m in read_topic_sync(bootstrap, topic)]


def checkpoint_store(penv: PipelineEnv, engine=None) -> MemoryStore:
    engine = engine or offline_engine()
    return MemoryStore(penv.redis_url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
                           capacity=engine.capacity, dtype=engine.state_dtype, namespace=penv.namespace)


def load_states(penv: PipelineEnv, cids: Iterable[str], engine=None) -> dict[str, ConversationState | None]:
    """The checkpointed state of each conversation (None where Redis has none)."""
    cids = list(cids)

    async def run() -> dict[str, ConversationState | None]:
        store = checkpoint_store(penv, engine)
        try:
            loaded = await store.load_many(cids)
        finally:
            await store.close()
        # only a live checkpoint counts: an empty view (new/deleted/expired) or a problem is None
        return {cid: (ck.state if getattr(ck, "live", False) else None) for cid, ck in loaded.items()}

    return run_sync(run)


# --------------------------------------------------------------------------- comparing


def state_difference(got: ConversationState | None, want: ConversationState, tol: float = TOL) -> str | None:
    """None if equal (bookkeeping exactly, latents within tol), else what differs."""
    if got is None:
        return "no checkpoint in Redis"
    diffs = []
    if got.seq != want.seq:
        diffs.append(f"seq {got.seq} != {want.seq}")
    if got.snapshot_len != want.snapshot_len:
        diffs.append(f"snapshot_len {got.snapshot_len} != {want.snapshot_len}")
    if got.segment_token_ids != want.segment_token_ids:
        diffs.append(f"segment token ids differ ({len(got.segment_token_ids)} vs {len(want.segment_token_ids)} turns)")
    if tuple(got.latents.shape) != tuple(want.latents.shape):
        diffs.append(f"latents shape {tuple(got.latents.shape)} != {tuple(want.latents.shape)}")
    elif got.latents.numel():
        d = float((got.latents.float() - want.latents.float()).abs().max())
        if not d <= tol:
            diffs.append(f"latents max abs diff {d:.3g} > {tol}")
    if (got.hidden_size, got.capacity, got.dtype) != (want.hidden_size, want.capacity, want.dtype):
        diffs.append("shape/dtype of the state differ")
    return "; ".join(diffs) or None


@dataclass
class OutputReport:
    expected: int = 0
    events: int = 0                      # embedding events read
    missing: list[Key] = field(default_factory=list)
    unexpected: list[Key] = field(default_factory=list)  # embeddings for keys not expected
    duplicates: int = 0                  # extra copies beyond the first
    duplicated_keys: int = 0
    # Of those extra copies: equal to the first copy byte for byte (a replay re-emitting the
    # outbox), or differing in any byte of the record (a recomputation: a zombie's write, a
    # turn applied twice). Compared as bytes, not within a float tolerance (issue #20).
    duplicates_byte_identical: int = 0
    duplicates_byte_different: int = 0
    non_identical: list[Key] = field(default_factory=list)  # keys whose copies differ in any byte
    max_abs_diff: float = 0.0
    worst: Key | None = None
    vector_mismatches: list[tuple[Key, float]] = field(default_factory=list)
    bad_records: list[str] = field(default_factory=list)  # wrong record key, unparseable, bad dim...
    state_mismatches: dict[str, str] = field(default_factory=dict)
    states_checked: int = 0
    outputs: Outputs | None = None

    def problems(self, *, allow_duplicates: bool = True) -> list[str]:
        p = []
        if self.missing:
            p.append(f"{len(self.missing)} missing embeddings, e.g. {sorted(self.missing)[:8]}")
        if self.unexpected:
            p.append(f"{len(self.unexpected)} unexpected embeddings, e.g. {sorted(self.unexpected)[:8]}")
        if self.duplicates and not allow_duplicates:
            p.append(f"{self.duplicates} duplicate embedding events over {self.duplicated_keys} keys")
        if self.non_identical:
            p.append(f"{len(self.non_identical)} keys whose copies differ, e.g. {sorted(self.non_identical)[:8]}")
        if self.vector_mismatches:
            p.append(f"{len(self.vector_mismatches)} vectors differ from offline, worst {self.worst} "
                     f"by {self.max_abs_diff:.3g}")
        if self.bad_records:
            p.append(f"{len(self.bad_records)} bad output records: {self.bad_records[:5]}")
        if self.state_mismatches:
            items = sorted(self.state_mismatches.items())[:8]
            p.append(f"{len(self.state_mismatches)} checkpoints differ from offline: {items}")
        return p

    def summary(self) -> str:
        return (f"expected {self.expected} embeddings; got {self.events} events, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {self.duplicates} duplicates over {self.duplicated_keys} keys "
                f"({self.duplicates_byte_identical} byte-identical, {self.duplicates_byte_different} byte-different), max |diff| vs offline {self.max_abs_diff:.3g} at "
                f"{self.worst}; {self.states_checked} checkpoints checked, {len(self.state_mismatches)} differ"
                + "".join(f"\n  - {p}" for p in self.problems()))


def compare(outputs: Outputs, expected: Expected, *, tol: float = TOL, keys: set[Key] | None = None,
            states: Mapping[str, ConversationState | None] | None = None,
            cids: Iterable[str] | None = None) -> OutputReport:
    """Compare parsed outputs (and loaded checkpoints) with the offline expectation.

    `keys` restricts which embeddings must be present (default: all expected); events for
    conversations outside `cids` (default: the expected ones) are ignored, so several scenarios
    can share a topic."""
    want = expected.keys() if keys is None else set(keys)
    scope = set(cids) if cids is not None else {cid for cid, _ in expected.embeddings} | set(expected.states)
    rep = OutputReport(expected=len(want), outputs=outputs)
    for rkey, cid in outputs.keys_of_records:
        if cid in scope and rkey != cid.encode():
            rep.bad_records.append(f"record key {rkey!r} for conversation {cid!r}")
    rep.bad_records += [f"unparseable: {v[:80]!r}" for v in outputs.unparseable]
    for key, evs in outputs.embeddings.items():
        if key[0] not in scope:
            continue
        rep.events += len(evs)
        if key not in want:
            rep.unexpected.append(key)
            continue
        if len(evs) > 1:
            rep.duplicates += len(evs) - 1
            rep.duplicated_keys += 1
            copies = outputs.raw.get(key) or [e.model_dump_json().encode() for e in evs]
            different = sum(1 for b in copies[1:] if b != copies[0])
            rep.duplicates_byte_different += different
            rep.duplicates_byte_identical += len(copies) - 1 - different
            if different:
                rep.non_identical.append(key)
        ref = expected.embeddings[key]
        for ev in evs:
            if key in expected.memory_lens and ev.memory_len != expected.memory_lens[key]:
                rep.bad_records.append(f"{key}: memory_len {ev.memory_len} != {expected.memory_lens[key]}")
            vec = decode_vector(ev.vector)
            if vec.shape != ref.shape:
                rep.bad_records.append(f"{key}: dim {vec.shape} != {ref.shape}")
                continue
            d = float(np.abs(vec - ref).max())
            if d > rep.max_abs_diff or rep.worst is None:
                rep.max_abs_diff, rep.worst = max(d, rep.max_abs_diff), key
            if not d <= tol:
                rep.vector_mismatches.append((key, d))
    rep.missing = sorted(want - {k for k in outputs.embeddings if k in want})
    if states is not None:
        for cid, st in expected.states.items():
            if cid not in states:
                continue
            rep.states_checked += 1
            diff = state_difference(states[cid], st, tol)
            if diff:
                rep.state_mismatches[cid] = diff
    return rep


def check_outputs(penv: PipelineEnv, expected: Expected, *, tol: float = TOL, keys: set[Key] | None = None,
                  check_states: bool = True, cids: Iterable[str] | None = None) -> OutputReport:
    """Read the embeddings topic (and the checkpoints of the expected conversations from
    Redis) and compare them with `expected`."""
    outputs = read_outputs(penv.kafka_bootstrap, penv.embeddings_topic)
    states = load_states(penv, expected.states) if check_states else None
    return compare(outputs, expected, tol=tol, keys=keys, states=states, cids=cids)


# --------------------------------------------------------------------------- waiting / metrics


def wait_for_embeddings(penv: PipelineEnv, keys: set[Key], *, timeout: float,
                        workers: Sequence[WorkerProc] = (), interval: float = 0.5) -> Outputs:
    """Poll the embeddings topic until every key has at least one event. Raises early if
    all the given workers have exited (nothing will come), with their logs."""
    deadline = time.monotonic() + timeout
    have: set[Key] = set()
    while True:
        outputs = read_outputs(penv.kafka_bootstrap, penv.embeddings_topic, idle_ms=500)
        have = {k for k in outputs.embeddings if k in keys}
        if len(have) == len(keys):
            return outputs
        if workers and not any(w.alive() for w in workers):
            logs = "\n".join(f"--- {w.name} ---\n{w.tail()}" for w in workers)
            raise AssertionError(f"all workers exited with {len(keys) - len(have)} embeddings missing:\n{logs}")
        if time.monotonic() > deadline:
            missing = sorted(keys - have)
            logs = "\n".join(f"--- {w.name} ---\n{w.tail(40)}" for w in workers)
            raise TimeoutError(f"{len(missing)}/{len(keys)} embeddings still missing after {timeout}s, "
                               f"e.g. {missing[:8]}\n{logs}")
        time.sleep(interval)


def metrics(worker: WorkerProc, timeout: float = 5.0) -> dict[str, float]:
    """The worker's Prometheus metrics: 'name' or 'name{labels}' -> value."""
    with urllib.request.urlopen(worker.url + "/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric(worker: WorkerProc, name: str, default: float = 0.0) -> float:
    try:
        return metrics(worker).get(name, default)
    except OSError:
        return default
