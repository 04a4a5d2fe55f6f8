"""Events as other producers write them, through a real worker (issue #13).

Each of these was dead-lettered before the tolerant reader; now each is processed and its
embedding equals the offline result of the turn *as documented* (README "Wire format"): the
expected turns below are written out by hand, not derived with the code under test.

* the previous schema version's exact bytes (evostream's own producer, version 1);
* a newer producer: unknown top-level fields (`channel_id`, an object), an unknown message
  field, OpenAI-style `name`, a `system` message, epoch-millisecond timestamps, an assistant
  `tool_calls` message, a `tool` result, content parts;
* Confluent wire-format framing (magic byte + schema id) on value and key;
* a turn with only a system prompt: acknowledged and counted, not embedded, nothing dead-lettered.

A second worker with `EVOSTREAM_INPUT_STRICT=true` gets the same records: it keeps the
version-1 contract (the newer shapes dead-lettered, the version-1 and framed ones embedded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from schemas.turns import ChatMessage, TurnInput

from support.oracle import check_outputs, compute_expected, metrics, read_dead_letters, wait_for_embeddings
from support.traffic import TopicMaker, Workers, pipeline_env, produce
from support.workers import PipelineEnv, WorkerProc, wait_for

TIMEOUT = 300.0
TS = "2026-01-01T00:00:00Z"


def _v1(cid: str, seq: int, user: str, assistant: str) -> bytes:
    # Byte-for-byte what the version-1 producer published (field order, no extras).
    return json.dumps({"type": "turn", "schema_version": 1, "conversation_id": cid, "seq": seq,
                       "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                       "timestamp": TS, "tenant": None, "metadata": {}}, separators=(",", ":")).encode()


def _framed(payload: bytes, schema_id: int = 42) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + payload


def _turn(cid: str, seq: int, user: str, assistant: str) -> TurnInput:
    msgs = [ChatMessage(role="user", content=user)] + ([ChatMessage(role="assistant", content=assistant)]
                                                       if assistant is not None else [])
    return TurnInput(conversation_id=cid, seq=seq, messages=msgs)


NEWER = [
    {"type": "turn", "conversation_id": "fmt-newer", "seq": 0, "timestamp": 1767225600000,
     "channel_id": "web-7", "trace": {"id": "t-1", "sampled": True},
     "messages": [{"role": "system", "content": "You are a travel agent."},
                  {"role": "user", "content": "Find me a train to Lyon.", "name": "alice"},
                  {"role": "assistant", "content": "The 9:04 TGV arrives at 11:00."}]},
    {"type": "turn", "conversation_id": "fmt-newer", "seq": 1, "timestamp": 1767225660000,
     "messages": [{"role": "user", "content": "Is it on time?", "x_client": "ios"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "status", "arguments": "{\"train\": \"9:04\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "{\"delay_min\": 0}"},
                  {"role": "assistant", "content": "Yes, no delay."}]},
    {"type": "turn", "conversation_id": "fmt-newer", "seq": 2, "timestamp": "2026-01-01T00:02:00+01:00",
     "messages": [{"role": "developer", "content": "Answer in one line."},
                  {"role": "user", "content": [{"type": "text", "text": "And back?"},
                                               {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "The 18:30."}]}]},
]


@dataclass
class Run:
    penv: PipelineEnv
    worker: WorkerProc
    metrics: dict[str, float]
    strict_penv: PipelineEnv
    strict_dead: list


EXPECTED_TURNS = {
    "fmt-v1": [_turn("fmt-v1", 0, "hello there", "hi!"), _turn("fmt-v1", 1, "how are you?", "fine.")],
    "fmt-newer": [_turn("fmt-newer", 0, "Find me a train to Lyon.", "The 9:04 TGV arrives at 11:00."),
                  _turn("fmt-newer", 1, "Is it on time?", "Yes, no delay."),
                  _turn("fmt-newer", 2, "And back?", "The 18:30.")],
    "fmt-confluent": [_turn("fmt-confluent", 0, "framed by a registry serializer", "read anyway")],
    "fmt-context": [_turn("fmt-context", 1, "first real question", "first real answer")],
}


STRICT_EMBEDDED = {("fmt-v1", 0), ("fmt-v1", 1), ("fmt-confluent", 0), ("fmt-context", 1)}


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    topics = TopicMaker(kafka_bootstrap, "interop-formats")
    procs = Workers()
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2, extra={"EVOSTREAM_API_AUTH": "off"})
        records = [
            (b"fmt-v1", _v1("fmt-v1", 0, "hello there", "hi!")),
            (b"fmt-v1", _v1("fmt-v1", 1, "how are you?", "fine.")),
            *[(b"fmt-newer", json.dumps(ev).encode()) for ev in NEWER],
            (_framed(b'"fmt-confluent"', 7), _framed(json.dumps({
                "type": "turn", "schema_version": 1, "conversation_id": "fmt-confluent", "seq": 0, "timestamp": TS,
                "messages": [{"role": "user", "content": "framed by a registry serializer"},
                             {"role": "assistant", "content": "read anyway"}]}).encode())),
            (b"fmt-context", json.dumps({"type": "turn", "conversation_id": "fmt-context", "seq": 0, "timestamp": TS,
                                         "messages": [{"role": "system", "content": "Be concise."}]}).encode()),
            (b"fmt-context", json.dumps({"type": "turn", "conversation_id": "fmt-context", "seq": 1, "timestamp": TS,
                                         "messages": [{"role": "user", "content": "first real question"},
                                                      {"role": "assistant", "content": "first real answer"}]}).encode()),
        ]
        strict_penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2,
                                   extra={"EVOSTREAM_API_AUTH": "off", "EVOSTREAM_INPUT_STRICT": "true"})
        produce(kafka_bootstrap, penv.turns_topic, records)
        produce(kafka_bootstrap, strict_penv.turns_topic, records)
        logs = tmp_path_factory.mktemp("interop-formats")
        worker = procs.add(WorkerProc(penv, logs, "fmt").start())
        strict = procs.add(WorkerProc(strict_penv, logs, "strict").start())
        expected = compute_expected(EXPECTED_TURNS)
        wait_for_embeddings(penv, expected.keys(), timeout=TIMEOUT, workers=[worker])
        wait_for_embeddings(strict_penv, STRICT_EMBEDDED, timeout=TIMEOUT, workers=[strict])
        strict_dead = wait_for(lambda: (lambda d: d if len(d) >= 4 else None)(
            read_dead_letters(kafka_bootstrap, strict_penv.dead_letter_topic)), 60, 1.0, "strict dead letters")
        yield Run(penv, worker, metrics(worker), strict_penv, strict_dead), expected
    finally:
        procs.stop_all()
        topics.close()


def test_every_shape_embedded_as_documented(run) -> None:
    r, expected = run
    rep = check_outputs(r.penv, expected)
    assert not rep.problems(allow_duplicates=False), rep.summary() + "\n" + r.worker.tail()
    assert rep.events == 7


def test_nothing_dead_lettered(run) -> None:
    r, _ = run
    dead = read_dead_letters(r.penv.kafka_bootstrap, r.penv.dead_letter_topic)
    assert dead == [], [(d.reason_code, d.reason) for d in dead]


def test_accepted_without_reading_is_counted(run) -> None:
    r, _ = run
    m = r.metrics
    assert m.get('evostream_input_unknown_fields_total{level="event"}') == 2, m  # channel_id, trace
    assert m.get('evostream_input_unknown_fields_total{level="message"}') == 1, m  # x_client
    assert m.get('evostream_input_unread_messages_total{role="system"}') == 2
    assert m.get('evostream_input_unread_messages_total{role="tool"}') == 1
    assert m.get('evostream_input_unread_messages_total{role="developer"}') == 1
    assert m.get("evostream_turns_without_text_total") == 1
    log = r.worker.log_path.read_text(errors="replace")
    # named by digest, never verbatim (issue #17: a name is producer input)
    from stream.processing.input_shapes import InputShapes

    assert InputShapes.name_digest("channel_id") in log and "does not know" in log
    assert "channel_id" not in log


def test_strict_mode_keeps_the_version_1_contract(run) -> None:
    r, expected = run
    got = {(json.loads(d.original_value())["conversation_id"], json.loads(d.original_value())["seq"]):
           d.reason_code.value for d in r.strict_dead}
    assert set(got) == {("fmt-newer", 0), ("fmt-newer", 1), ("fmt-newer", 2), ("fmt-context", 0)}, got
    assert set(got.values()) <= {"schema_violation", "unknown_role"}, got
    assert got[("fmt-context", 0)] == "unknown_role"  # a lone system message: the role is the only problem
    strict_expected = compute_expected({"fmt-v1": EXPECTED_TURNS["fmt-v1"], "fmt-confluent": EXPECTED_TURNS["fmt-confluent"],
                                        "fmt-context": EXPECTED_TURNS["fmt-context"]})
    rep = check_outputs(r.strict_penv, strict_expected)
    assert not rep.problems(allow_duplicates=False), rep.summary()
