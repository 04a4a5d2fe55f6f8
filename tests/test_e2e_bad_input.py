"""Bad input through a real worker: every defined outcome of docs/CONTRACTS.md, end to end.

One worker (small record and turn-token limits) gets, on a 2-partition turns topic: some good
turns, then one handcrafted record per bad-input case plus a few dozen hostile records from
`tests/strategies.py`, then more good turns on every partition. A second worker (gap policy
`dead_letter`) runs beside it on its own topics. Afterwards:

* every rejected record has a `DeadLetterEvent` with the right `reason_code` and the exact
  original key and value bytes, and nothing else was dead-lettered;
* the good turns produced after the bad ones were embedded (equal to offline), so no bad
  record stalled its partition, and the workers are still alive;
* duplicates are skipped and counted, gaps applied and counted (or dead-lettered by policy),
  and a delete removes the state and emits `conversation_deleted`.
"""

from __future__ import annotations

import base64
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas.events import (
    OUTBOUND_EVENT_ADAPTER,
    ConversationDeleted,
    DeadLetterEvent,
    DeadLetterReason,
    EmbeddingEvent,
)
from schemas.turns import TurnInput
from schemas.vectors import decode_vector
from stream.state.errors import FingerprintMismatch
from stream.state.records import TurnCommit
from stream.state.store import MemoryStore
from stream.kafka.topics import run_sync

from strategies import DECODER_REASONS, hostile_records
from support.oracle import (
    TOL,
    Expected,
    compare,
    compute_expected,
    expected_for,
    load_states,
    metrics,
    offline_engine,
    read_dead_letters,
    read_outputs,
    wait_for_embeddings,
)
from support.traffic import (
    TopicMaker,
    Workers,
    delete_record,
    generate_traffic,
    pipeline_env,
    produce,
    random_text,
    turn_record,
)
from support.workers import PipelineEnv, WorkerProc, read_topic_sync, wait_for

R = DeadLetterReason
MAX_RECORD_BYTES = 16 * 1024   # hostile_records needs >= 16 KiB
MAX_JSON_DEPTH = 32            # the worker's default
MAX_TURN_TOKENS = 128
TIMEOUT = 600.0

_LONG_TEXT = random_text(random.Random(7), 300)  # ~330 tokens: over MAX_TURN_TOKENS, under MAX_RECORD_BYTES


def _turn_json(**fields) -> bytes:
    """A turn body with chosen (possibly invalid) fields, serialised as given."""
    body = {"type": "turn", "conversation_id": "x", "seq": 0,
            "messages": [{"role": "user", "content": "hello there"}], "timestamp": "2025-01-01T00:00:00Z"}
    body.update(fields)
    return json.dumps(body, ensure_ascii=False).encode()


# name -> (key, value, reason). One per bad-input case of CONTRACTS.md / DeadLetterReason.
CASES: dict[str, tuple[bytes | None, bytes | None, DeadLetterReason]] = {
    "invalid_json_syntax": (b"bad-json", b'{"type": "turn", "conversation_id": "bad-json", ', R.INVALID_JSON),
    "invalid_json_null_value": (b"bad-null", None, R.INVALID_JSON),
    "invalid_json_top_level": (b"bad-array", b'[{"type": "turn"}]', R.INVALID_JSON),
    "invalid_utf8": (b"bad-utf8", _turn_json(conversation_id="bad-utf8").replace(b"hello", b"hel\xfflo"), R.INVALID_UTF8),
    "too_deep": (b"bad-deep", b"[" * (MAX_JSON_DEPTH + 8) + b"]" * (MAX_JSON_DEPTH + 8), R.TOO_DEEP),
    "too_large": (b"bad-large", turn_record("bad-large", 0, "x" * (MAX_RECORD_BYTES + 1000))[1], R.TOO_LARGE),
    "schema_violation": (b"bad-schema", _turn_json(conversation_id="bad-schema", seq="5"), R.SCHEMA_VIOLATION),
    # Unknown fields and the common chat roles are accepted (issue #13, tests/test_interop_formats.py);
    # a known field of the wrong shape and a role no chat format defines are still refused.
    "metadata_not_flat": (b"bad-field", _turn_json(conversation_id="bad-field", metadata={"a": {"b": 1}}),
                          R.SCHEMA_VIOLATION),
    "unknown_role": (b"bad-role", _turn_json(conversation_id="bad-role", messages=[{"role": "robot", "content": "hi"}]),
                     R.UNKNOWN_ROLE),
    "empty_turn": (b"bad-empty", _turn_json(conversation_id="bad-empty", messages=[{"role": "user", "content": " \n "}]),
                   R.EMPTY_TURN),
    "missing_key_null": (None, _turn_json(conversation_id="bad-nokey"), R.MISSING_KEY),
    "missing_key_empty": (b"", _turn_json(conversation_id="bad-emptykey"), R.MISSING_KEY),
    "key_mismatch": (b"someone-else", _turn_json(conversation_id="bad-mismatch"), R.KEY_MISMATCH),
    "seq_out_of_range": (b"bad-seq", _turn_json(conversation_id="bad-seq", seq=-1), R.SEQ_OUT_OF_RANGE),
    "unknown_type": (b"bad-type", _turn_json(conversation_id="bad-type", type="embedding"), R.UNKNOWN_TYPE),
    "turn_too_long": (b"bad-long", turn_record("bad-long", 0, _LONG_TEXT)[1], R.TURN_TOO_LONG),
    # A conversation checkpointed under another model fingerprint (seeded in Redis below).
    "foreign_fingerprint": (b"foreign-conv", turn_record("foreign-conv", 1, "continue please")[1], R.FINGERPRINT_MISMATCH),
    # A conversation whose checkpoint lost its meta key (as an eviction would; seeded below).
    "checkpoint_corrupt": (b"corrupt-conv", turn_record("corrupt-conv", 1, "continue please")[1], R.CHECKPOINT_CORRUPT),
    # Keys of tenant acme's conversation copied under tenant globex's names (seeded below).
    "tenant_mismatch": (b"copied-conv", _turn_json(conversation_id="copied-conv", seq=1, tenant="globex"),
                        R.TENANT_MISMATCH),
    # Issue #17: an applied seq re-sent with other messages (dup-conv 0..2 are applied before),
    # and the seq gap-conv skipped (0, 1, 3 applied) arriving after the later one.
    "conflicting_duplicate": (b"dup-conv", turn_record("dup-conv", 1, "a different text under an old seq")[1],
                              R.CONFLICTING_DUPLICATE),
    "late_turn": (b"gap-conv", turn_record("gap-conv", 2, "gap test turn 2, late")[1], R.LATE_TURN),
}
GAP_DL_CASE = "seq_gap_dead_letter"  # the gap_policy=dead_letter worker's case (R.SEQ_GAP)
FOREIGN_FP = "foreign-model-fingerprint"


@dataclass
class Sent:
    name: str
    key: bytes | None
    value: bytes | None
    reason: DeadLetterReason
    partition: int
    offset: int


@dataclass
class Run:
    penv: PipelineEnv
    worker: WorkerProc
    gap_penv: PipelineEnv
    gap_worker: WorkerProc
    cases: dict[str, Sent]
    hostile: list[Sent]
    good_keys_after: set
    expected: Expected
    dead_letters: list[DeadLetterEvent]
    gap_dead_letters: list[DeadLetterEvent]
    metrics: dict[str, float]
    gap_metrics: dict[str, float]
    raw_outputs: list = field(default_factory=list)
    gap_expected: Expected | None = None
    worker_redis_keys: list = field(default_factory=list)


def _draw_hostile(n_batches: int = 4, per_batch: int = 12) -> list[tuple[bytes | None, bytes | None, DeadLetterReason]]:
    """A deterministic mix of hostile records (every decoder reason), drawn with hypothesis."""
    drawn: list = []

    @settings(max_examples=n_batches, derandomize=True, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_records(max_bytes=MAX_RECORD_BYTES, max_depth=MAX_JSON_DEPTH, reasons=DECODER_REASONS),
                    min_size=per_batch, max_size=per_batch))
    def collect(batch: list) -> None:
        drawn.extend(batch)

    collect()
    # ...and at least one of every decoder reason, whatever the draws were.
    for reason in sorted(DECODER_REASONS):
        @settings(max_examples=2, derandomize=True, database=None, phases=[Phase.generate],
                  deadline=None, suppress_health_check=list(HealthCheck))
        @given(hostile_records(max_bytes=MAX_RECORD_BYTES, max_depth=MAX_JSON_DEPTH, reasons=[reason]))
        def one(record: tuple) -> None:
            drawn.append(record)

        one()
    # Hypothesis starts from the simplest example (the same record repeated): keep one copy.
    return list({(k, v): (k, v, r) for k, v, r in drawn}.values())


def _seed_foreign_checkpoint(penv: PipelineEnv, cid: str) -> None:
    """Checkpoint `cid` as if another model had written it."""
    engine = offline_engine()
    states = {cid: engine.new_state()}
    (out,) = engine.step(states, [TurnInput(conversation_id=cid, seq=0, messages=[{"role": "user", "content": "hi"}])])

    async def run() -> None:
        store = MemoryStore(penv.redis_url, fingerprint=FOREIGN_FP, hidden_size=engine.hidden_size,
                                capacity=engine.capacity, dtype=engine.state_dtype, namespace=penv.namespace)
        try:
            (res,) = await store.commit([TurnCommit(ref=cid, expected_seq=-1, state=states[cid],
                                                    deltas=[out.delta])])
            assert res.applied
        finally:
            await store.close()

    run_sync(run)


def _seed_damaged_checkpoints(penv: PipelineEnv) -> None:
    """`corrupt-conv`: a real checkpoint whose meta key is then deleted (state keys without
    their meta). `copied-conv`: tenant acme's checkpoint copied under tenant globex's keys."""
    import redis

    from stream.state.keys import conversation_keys
    from stream.identity import ConversationRef

    engine = offline_engine()
    refs = {"corrupt-conv": ConversationRef(None, "corrupt-conv"), "copied-conv": ConversationRef("acme", "copied-conv")}
    states = {ref.tag: engine.new_state() for ref in refs.values()}
    outs = {ref.tag: engine.step(states, [TurnInput(conversation_id=ref.tag, seq=0,
                                                    messages=[{"role": "user", "content": "hi"}])])[0]
            for ref in refs.values()}

    async def run() -> None:
        store = MemoryStore(penv.redis_url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
                                capacity=engine.capacity, dtype=engine.state_dtype, namespace=penv.namespace)
        try:
            res = await store.commit([TurnCommit(ref=ref, expected_seq=-1, state=states[ref.tag],
                                                 deltas=[outs[ref.tag].delta]) for ref in refs.values()])
            assert all(r.applied for r in res)
        finally:
            await store.close()

    run_sync(run)
    client = redis.Redis.from_url(penv.redis_url)
    try:
        client.delete(conversation_keys(penv.namespace, refs["corrupt-conv"]).meta)
        src = conversation_keys(penv.namespace, refs["copied-conv"])
        dst = conversation_keys(penv.namespace, ConversationRef("globex", "copied-conv"))
        for a, b in zip(src, dst):
            if client.exists(a):
                client.copy(a, b)
    finally:
        client.close()


def _redis_keys(penv: PipelineEnv) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(penv.redis_url)
    try:
        return list(client.scan_iter(match=f"{penv.namespace}:*", count=1000))
    finally:
        client.close()


def _send(bootstrap: str, topic: str, named: list[tuple[str, bytes | None, bytes | None, DeadLetterReason]]) -> list[Sent]:
    produced = produce(bootstrap, topic, [(k, v) for _, k, v, _ in named])
    return [Sent(n, k, v, r, p.partition, p.offset) for (n, k, v, r), p in zip(named, produced)]


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    topics = TopicMaker(kafka_bootstrap, "e2e-bad-input")
    procs = Workers()
    logs = tmp_path_factory.mktemp("e2e-bad")
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2, extra={
            "EVOSTREAM_MAX_RECORD_BYTES": str(MAX_RECORD_BYTES),
            "EVOSTREAM_MAX_JSON_DEPTH": str(MAX_JSON_DEPTH),
            "EVOSTREAM_MAX_TURN_TOKENS": str(MAX_TURN_TOKENS),
        })
        gap_penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=1,
                                extra={"EVOSTREAM_GAP_POLICY": "dead_letter"})
        worker = procs.add(WorkerProc(penv, logs, "bad").start())
        gap_worker = procs.add(WorkerProc(gap_penv, logs, "gapdl").start())

        # --- main worker -------------------------------------------------------------------
        good = generate_traffic(8, 4, seed=404, prefix="good", words=(1, 20), long_turn_p=0.0)
        good_records = good.records()
        half = len(good_records) // 2
        _seed_foreign_checkpoint(penv, "foreign-conv")
        _seed_damaged_checkpoints(penv)
        before = produce(kafka_bootstrap, penv.turns_topic, good_records[:half])
        dup = [turn_record("dup-conv", s, f"duplicate test turn {s}") for s in range(3)]
        gap = [turn_record("gap-conv", s, f"gap test turn {s}") for s in (0, 1, 3)]
        dele = [turn_record("del-conv", s, f"delete test turn {s}") for s in range(3)]
        fresh = turn_record("del-conv", 0, "after the delete, a new conversation")
        gone = [turn_record("del-gone", s, f"forget me {s}") for s in range(2)]
        scenario = (dup + gap + dele + gone + [delete_record("del-conv", 2), delete_record("del-unknown"),
                                               delete_record("del-gone")]
                    + [dup[2], fresh])
        produce(kafka_bootstrap, penv.turns_topic, scenario)
        cases = _send(kafka_bootstrap, penv.turns_topic, [(n, k, v, r) for n, (k, v, r) in CASES.items()])
        hostile = _send(kafka_bootstrap, penv.turns_topic,
                        [(f"hostile-{i}", k, v, r) for i, (k, v, r) in enumerate(_draw_hostile())])
        after = produce(kafka_bootstrap, penv.turns_topic, good_records[half:])
        assert {p.partition for p in after} == {0, 1}, "good turns after the bad ones must reach every partition"
        assert before

        # --- gap_policy=dead_letter worker --------------------------------------------------
        g = [turn_record("gapdl-conv", s, f"gap policy turn {s}") for s in (0, 1, 3)]
        gap_sent = _send(kafka_bootstrap, gap_penv.turns_topic,
                         [("ok-0", *g[0], None), ("ok-1", *g[1], None), (GAP_DL_CASE, *g[2], R.SEQ_GAP),
                          ("ok-2", *turn_record("gapdl-conv", 2, "gap policy turn 2"), None), ("ok-3", *g[2], None)])
        gap_good = generate_traffic(3, 3, seed=405, prefix="gapgood", words=(1, 20), long_turn_p=0.0)
        produce(kafka_bootstrap, gap_penv.turns_topic, gap_good.records())

        # --- offline expectations (while the workers start and work) ------------------------
        def inputs(records):
            return [TurnInput.model_validate({k: v for k, v in json.loads(val).items()
                                              if k in ("conversation_id", "seq", "messages")}) for _, val in records]

        expected = expected_for(good).merge(compute_expected({
            "dup-conv": inputs(dup), "gap-conv": inputs(gap), "del-conv": inputs([fresh]), "del-gone": inputs(gone),
        }))
        gap_expected = expected_for(gap_good).merge(compute_expected({
            "gapdl-conv": inputs([g[0], g[1], turn_record("gapdl-conv", 2, "gap policy turn 2"), g[2]]),
        }))

        worker.wait_ready()
        gap_worker.wait_ready()
        good_after = {(json.loads(p.value)["conversation_id"], json.loads(p.value)["seq"]) for p in after}
        wait_for_embeddings(penv, good.keys() | {("dup-conv", 2), ("gap-conv", 3)}, timeout=TIMEOUT, workers=[worker])
        wait_for_embeddings(gap_penv, gap_good.keys() | {("gapdl-conv", 3)}, timeout=TIMEOUT, workers=[gap_worker])
        n_bad = len(cases) + len(hostile)

        def all_dead_letters() -> list[DeadLetterEvent] | None:
            found = read_dead_letters(kafka_bootstrap, penv.dead_letter_topic)
            return found if len(found) >= n_bad else None

        dls = wait_for(all_dead_letters, timeout=120, interval=1.0, what=f"{n_bad} dead letters")
        gap_dls = read_dead_letters(kafka_bootstrap, gap_penv.dead_letter_topic)
        raw = read_topic_sync(kafka_bootstrap, penv.embeddings_topic)
        yield Run(penv, worker, gap_penv, gap_worker, {s.name: s for s in cases + [
            s for s in gap_sent if s.name == GAP_DL_CASE]}, hostile, good_after, expected, dls, gap_dls,
            metrics(worker), metrics(gap_worker), raw, gap_expected, _redis_keys(penv))
    finally:
        procs.stop_all()
        topics.close()


def _by_coordinates(dls: list[DeadLetterEvent]) -> dict[tuple[int, int], list[DeadLetterEvent]]:
    out: dict[tuple[int, int], list[DeadLetterEvent]] = defaultdict(list)
    for d in dls:
        out[(d.partition, d.offset)].append(d)
    return out


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _check_dead_letter(run: Run, sent: Sent, dls: list[DeadLetterEvent], topic: str) -> None:
    found = _by_coordinates(dls).get((sent.partition, sent.offset), [])
    assert found, f"{sent.name}: no dead letter for {topic}/{sent.partition}@{sent.offset} (expected {sent.reason})"
    for d in found:
        assert d.topic == topic
        assert d.reason_code == sent.reason, f"{sent.name}: {d.reason_code} ({d.reason}), expected {sent.reason}"
        assert d.original_key_b64 == _b64(sent.key), f"{sent.name}: key {d.original_key_b64!r} != {_b64(sent.key)!r}"
        assert d.original_value_b64 == _b64(sent.value), f"{sent.name}: original value bytes differ"
        assert d.original_key() == sent.key and d.original_value() == sent.value
        assert d.reason and d.worker


# --------------------------------------------------------------------------- dead letters


def test_cases_cover_every_input_reason() -> None:
    # processing_error is the answer to an unexpected failure (the model step raising on a
    # turn); a worker cannot be made to fail that way from the outside, so it is covered at
    # the pipeline level: tests/test_production_faults.py::test_a_turn_the_model_fails_on_*
    covered = {r for _, _, r in CASES.values()} | {R.SEQ_GAP, R.PROCESSING_ERROR}
    assert covered == set(DeadLetterReason), f"no end-to-end case for {set(DeadLetterReason) - covered}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_record_is_dead_lettered_with_its_exact_bytes(run: Run, name: str) -> None:
    _check_dead_letter(run, run.cases[name], run.dead_letters, run.penv.turns_topic)


def test_seq_gap_dead_lettered_under_dead_letter_policy(run: Run) -> None:
    _check_dead_letter(run, run.cases[GAP_DL_CASE], run.gap_dead_letters, run.gap_penv.turns_topic)
    assert len(run.gap_dead_letters) == 1, [(d.reason_code, d.offset) for d in run.gap_dead_letters]
    # The missing turn arrived later, then the refused one again: both applied, equal to offline.
    outputs = read_outputs(run.gap_penv.kafka_bootstrap, run.gap_penv.embeddings_topic)
    rep = compare(outputs, run.gap_expected, states=load_states(run.gap_penv, run.gap_expected.states))
    assert not rep.problems(allow_duplicates=False), rep.summary()
    assert run.gap_metrics.get("evostream_seq_gaps_total", 0) == 0
    assert run.gap_metrics.get('evostream_dead_letters_total{reason="seq_gap"}') == 1


def test_hostile_mix_dead_lettered_with_exact_bytes(run: Run) -> None:
    assert len(run.hostile) >= 36
    reasons = Counter(s.reason for s in run.hostile)
    assert set(reasons) == set(DECODER_REASONS), reasons
    for sent in run.hostile:
        _check_dead_letter(run, sent, run.dead_letters, run.penv.turns_topic)


def test_nothing_else_dead_lettered(run: Run) -> None:
    wanted = {(s.partition, s.offset) for s in list(run.cases.values()) + run.hostile if s.name != GAP_DL_CASE}
    got = _by_coordinates(run.dead_letters)
    extra = {k: [d.reason_code.value for d in v] for k, v in got.items() if k not in wanted}
    assert not extra, f"unexpected dead letters: {extra}"
    dupes = {k: len(v) for k, v in got.items() if len(v) > 1}
    assert not dupes, f"records dead-lettered more than once: {dupes}"
    per_reason = Counter(d.reason_code.value for d in run.dead_letters)
    for reason, n in per_reason.items():
        assert run.metrics.get(f'evostream_dead_letters_total{{reason="{reason}"}}') == n, reason


# --------------------------------------------------------------------------- good traffic survives


def test_good_turns_after_bad_ones_are_processed(run: Run) -> None:
    outputs = read_outputs(run.penv.kafka_bootstrap, run.penv.embeddings_topic)
    deleted = ("del-conv", "del-gone")  # checked in test_delete_removes_state_and_emits_tombstone
    kept = [c for c in run.expected.states if c not in deleted]
    rep = compare(outputs, run.expected, states=load_states(run.penv, kept),
                  keys={k for k in run.expected.embeddings if k[0] in kept}, cids=kept)
    assert run.good_keys_after and run.good_keys_after <= set(outputs.embeddings)
    assert not rep.problems(allow_duplicates=True), rep.summary() + "\n" + run.worker.tail()
    # Only conversations with good turns got state: nothing from a rejected record was applied.
    rejected_cids = {"bad-json", "bad-utf8", "bad-large", "bad-schema", "bad-role", "bad-empty", "bad-mismatch",
                     "bad-seq", "bad-type", "bad-long", "bad-nokey", "bad-emptykey", "someone-else"}
    leaked = {c: s for c, s in load_states(run.penv, rejected_cids).items() if s is not None}
    assert not leaked, f"rejected records changed state: {sorted(leaked)}"
    assert {cid for cid, _ in outputs.embeddings} <= set(run.expected.states), \
        "embeddings for conversations that only had bad records"


def test_workers_still_alive_and_healthy(run: Run) -> None:
    for w in (run.worker, run.gap_worker):
        assert w.alive(), w.tail()
        code, body = w.get("/healthz")
        assert code == 200 and body["status"] == "ok"
        code, body = w.get("/readyz")
        assert code == 200 and body["ready"], body


def test_foreign_and_damaged_checkpoints_left_untouched(run: Run) -> None:
    from stream.state.records import MemoryProblem
    from stream.identity import ConversationRef
    from support.oracle import checkpoint_store

    async def go() -> dict:
        store = checkpoint_store(run.penv)
        try:
            return await store.load_many(["foreign-conv", "corrupt-conv", ConversationRef("globex", "copied-conv")])
        finally:
            await store.close()

    got = run_sync(go)
    codes = {str(k): (v.code if isinstance(v, MemoryProblem) else None) for k, v in got.items()}
    assert codes == {"foreign-conv": R.FINGERPRINT_MISMATCH, "corrupt-conv": R.CHECKPOINT_CORRUPT,
                     "globex/copied-conv": R.TENANT_MISMATCH}
    with pytest.raises(FingerprintMismatch):
        run_sync(lambda: _load_one(run.penv, "foreign-conv"))


async def _load_one(penv: PipelineEnv, cid: str):
    from support.oracle import checkpoint_store

    store = checkpoint_store(penv)
    try:
        return await store.load(cid)
    finally:
        await store.close()


# --------------------------------------------------------------------------- pipeline outcomes


def test_duplicates_skipped_and_counted(run: Run) -> None:
    # dup-conv's seq 2 sent again (a plain duplicate); its seq 1 re-sent with another text is a
    # conflicting_duplicate since issue #17 (a dead-letter case above), counted apart
    assert run.metrics.get("evostream_turns_duplicate_total", 0) >= 1, run.metrics
    assert run.metrics.get("evostream_turns_conflicting_total", 0) == 1, run.metrics
    outputs = read_outputs(run.penv.kafka_bootstrap, run.penv.embeddings_topic)
    for seq in range(3):
        evs = outputs.embeddings[("dup-conv", seq)]
        assert evs and len({e.vector.b64 for e in evs}) == 1, f"dup-conv/{seq}: {len(evs)} differing copies"
        ref = run.expected.embeddings[("dup-conv", seq)]
        assert float(np.abs(decode_vector(evs[0].vector) - ref).max()) <= TOL
    (state,) = load_states(run.penv, ["dup-conv"]).values()
    assert state is not None and state.seq == 2
    assert state.equals(run.expected.states["dup-conv"], atol=TOL), "the replayed seq 1 (other text) changed memory"


def test_gap_applied_with_warning_and_counter(run: Run) -> None:
    assert run.metrics.get("evostream_seq_gaps_total") == 1, run.metrics.get("evostream_seq_gaps_total")
    outputs = read_outputs(run.penv.kafka_bootstrap, run.penv.embeddings_topic)
    assert ("gap-conv", 2) not in outputs.embeddings
    for seq in (0, 1, 3):
        evs = outputs.embeddings[("gap-conv", seq)]
        assert evs, f"gap-conv/{seq} missing"
        ref = run.expected.embeddings[("gap-conv", seq)]
        assert float(np.abs(decode_vector(evs[0].vector) - ref).max()) <= TOL
    (state,) = load_states(run.penv, ["gap-conv"]).values()
    assert state is not None and state.seq == 3 and state.equals(run.expected.states["gap-conv"], atol=TOL)
    assert "seq gap" in run.worker.log_path.read_text(errors="replace")


def test_delete_removes_state_and_emits_tombstone(run: Run) -> None:
    events = []
    for msg in run.raw_outputs:
        ev = OUTBOUND_EVENT_ADAPTER.validate_json(msg.value)
        if ev.conversation_id in ("del-conv", "del-unknown", "del-gone"):
            events.append((msg.partition, msg.offset, msg.key, ev))
    events.sort(key=lambda x: (x[0], x[1]))
    kinds = [(ev.type, getattr(ev, "seq", None)) for _, _, _, ev in events if ev.conversation_id == "del-conv"]
    # Output order on the conversation's partition: its turns, the tombstone, then the new turn 0.
    assert kinds == [("embedding", 0), ("embedding", 1), ("embedding", 2), ("conversation_deleted", None),
                     ("embedding", 0)], kinds
    tombs = {ev.conversation_id: ev for _, _, _, ev in events if isinstance(ev, ConversationDeleted)}
    assert tombs["del-conv"].deleted_through_seq == 2
    assert tombs["del-unknown"].deleted_through_seq is None
    assert tombs["del-gone"].deleted_through_seq == 1
    gone = [(ev.type, getattr(ev, "seq", None)) for _, _, _, ev in events if ev.conversation_id == "del-gone"]
    assert gone == [("embedding", 0), ("embedding", 1), ("conversation_deleted", None)], gone
    for _, _, _, ev in events:
        if ev.conversation_id == "del-gone" and isinstance(ev, EmbeddingEvent):
            ref = run.expected.embeddings[("del-gone", ev.seq)]
            assert float(np.abs(decode_vector(ev.vector) - ref).max()) <= TOL
    assert load_states(run.penv, ["del-gone", "del-unknown"]) == {"del-gone": None, "del-unknown": None}
    keys = run.worker_redis_keys
    assert not [k for k in keys if b"{del-gone}" in k or b"{del-unknown}" in k], "keys left after delete"
    assert all(k == ev.conversation_id.encode() for _, _, k, ev in events)
    # The memory after the delete is a fresh conversation's: nothing of the deleted turns survived.
    (state,) = load_states(run.penv, ["del-conv"]).values()
    assert state is not None and state.seq == 0
    assert state.equals(run.expected.states["del-conv"], atol=TOL)
    last = [ev for _, _, _, ev in events if isinstance(ev, EmbeddingEvent) and ev.conversation_id == "del-conv"][-1]
    ref = run.expected.embeddings[("del-conv", 0)]
    assert float(np.abs(decode_vector(last.vector) - ref).max()) <= TOL
    assert run.metrics.get("evostream_conversations_deleted_total") == 3
