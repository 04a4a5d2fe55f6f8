"""Wire schemas: golden examples, round trips, bounds, and the vector encoding."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from schemas.fields import MAX_REASON_BYTES, MAX_SEQ
from schemas.events import (
    INBOUND_EVENT_ADAPTER,
    OUTBOUND_EVENT_ADAPTER,
    ConversationDelete,
    ConversationDeleted,
    DeadLetterEvent,
    DeadLetterReason,
    EmbeddingEvent,
    QueryRequest,
    QueryResponse,
    SearchHit,
    SourceRef,
    StageTimings,
    TurnEvent,
    TurnEventV1,
    dead_letter_size_bound,
)
from schemas.turns import ChatMessage, TurnInput
from schemas.vectors import MAX_DIM, EncodedVector, decode_vector, encode_vector

T0 = datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=timezone.utc)

TURN_JSON = (
    '{"type":"turn","schema_version":1,"conversation_id":"conv-42","seq":7,'
    '"messages":[{"role":"user","content":"What is the capital of France?"},'
    '{"role":"assistant","content":"Paris."}],'
    '"timestamp":"2024-05-01T12:30:15.250000Z","tenant":"acme",'
    '"metadata":{"channel":"web","lang":"en"}}'
)


def _embedding_event(**overrides: object) -> EmbeddingEvent:
    vector = np.array([0.6, -0.8, 0.0, -0.0], dtype=np.float32)
    fields: dict = dict(
        conversation_id="conv-42",
        seq=7,
        vector=encode_vector(vector),
        dim=4,
        model="evo-embedding-small",
        checkpoint="sha256:3f9a1c0e2b7d",
        memory_len=96,
        tenant="acme",
        source=SourceRef(topic="turns", partition=3, offset=1234),
        timings=StageTimings(queue_ms=4.5, step_ms=21.25, checkpoint_ms=1.75),
        produced_at=T0,
    )
    fields.update(overrides)
    return EmbeddingEvent(**fields)


# --------------------------------------------------------------------------- inbound


def test_turn_event_golden_json_round_trips_exactly() -> None:
    event = TurnEvent.model_validate_json(TURN_JSON, strict=True)
    assert event.seq == 7 and event.timestamp == T0
    assert [(m.role, m.content) for m in event.messages] == [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
    ]
    assert event.model_dump_json() == TURN_JSON
    assert TurnEventV1.model_validate_json(TURN_JSON, strict=True).model_dump_json() == TURN_JSON


def test_turn_event_to_turn_input() -> None:
    event = TurnEvent.model_validate_json(TURN_JSON)
    turn = event.to_turn_input()
    assert isinstance(turn, TurnInput)
    assert (turn.conversation_id, turn.seq, turn.user, turn.assistant) == (
        "conv-42",
        7,
        "What is the capital of France?",
        "Paris.",
    )


def test_turn_event_defaults_and_single_sided_turns() -> None:
    for roles in (["user"], ["assistant"]):
        event = TurnEvent(
            conversation_id="c",
            seq=0,
            messages=[{"role": r, "content": "hi"} for r in roles],
            timestamp=T0,
        )
        assert event.type == "turn" and event.schema_version == 1
        assert event.tenant is None and event.metadata == {}
    # One side empty is fine; the turn is not.
    TurnEvent(
        conversation_id="c",
        seq=0,
        messages=[{"role": "user", "content": ""}, {"role": "assistant", "content": "hello"}],
        timestamp=T0,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"timestamp": datetime(2024, 1, 1)},  # naive
        {"timestamp": "2024-01-01T00:00:00"},  # naive
        {"timestamp": "1714564800"},  # Unix time as a string: seconds or ms? not guessed
        {"timestamp": 1714564800.5},  # only integer epoch milliseconds
        {"conversation_id": ""},
        {"conversation_id": "x" * 257},
        {"conversation_id": "a\nb"},
        {"conversation_id": "a\x85b"},  # C1 control
        {"conversation_id": "a\ud800"},  # lone surrogate: could never be a Kafka/Redis key
        {"seq": -1},
        {"seq": MAX_SEQ + 1},
        {"messages": []},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "\n"}]},
        {"messages": [{"role": "robot", "content": "a"}]},
        {"tenant": ""},
        {"metadata": {str(i): i for i in range(33)}},
        {"metadata": {"k" * 65: 1}},
        {"metadata": {"k": "v" * 257}},
        {"metadata": {"k": float("nan")}},
        {"metadata": {"k": 2**60}},  # must not silently become a rounded float
        {"metadata": {"k": [1]}},
        {"schema_version": 2},
    ],
)
@pytest.mark.parametrize("model", [TurnEvent, TurnEventV1])
def test_turn_event_rejects(change: dict, model: type) -> None:
    fields = dict(
        conversation_id="c", seq=0, messages=[{"role": "user", "content": "hi"}], timestamp=T0
    )
    fields.update(change)
    with pytest.raises(ValidationError):
        model(**fields)


@pytest.mark.parametrize(
    "change",
    [
        {"timestamp": 1714564800000},
        {"messages": [{"role": "user", "content": "a"}] * 3},
        {"messages": [{"role": "system", "content": "a"}]},
        {"messages": [{"role": "user", "content": "a", "name": "bob"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        {"surprise": 1},
    ],
)
def test_tolerant_turn_accepts_what_v1_rejected(change: dict) -> None:
    fields = dict(
        conversation_id="c", seq=0, messages=[{"role": "user", "content": "hi"}], timestamp=T0
    )
    fields.update(change)
    TurnEvent(**fields)
    with pytest.raises(ValidationError):
        TurnEventV1(**fields)


def test_seq_bounds_are_inclusive() -> None:
    for seq in (0, MAX_SEQ):
        messages = [{"role": "user", "content": "x"}]
        TurnEvent(conversation_id="c", seq=seq, messages=messages, timestamp=T0)


def test_inbound_union_discriminates() -> None:
    turn = INBOUND_EVENT_ADAPTER.validate_json(TURN_JSON)
    assert isinstance(turn, TurnEvent)
    delete_json = (
        '{"type":"delete","schema_version":1,"conversation_id":"conv-42","seq":7,'
        '"timestamp":"2024-05-01T12:30:15.250000Z","tenant":"acme"}'
    )
    delete = INBOUND_EVENT_ADAPTER.validate_json(delete_json, strict=True)
    assert isinstance(delete, ConversationDelete)
    assert delete.model_dump_json() == delete_json
    minimal = INBOUND_EVENT_ADAPTER.validate_json(
        '{"type":"delete","conversation_id":"c","timestamp":"2024-05-01T12:30:15+02:00"}'
    )
    assert minimal.seq is None and minimal.timestamp.utcoffset().total_seconds() == 7200
    with pytest.raises(ValidationError):
        INBOUND_EVENT_ADAPTER.validate_json('{"type":"delete","conversation_id":"c","messages":[]}')


# --------------------------------------------------------------------------- outbound


def test_embedding_event_round_trip_and_idempotency_key() -> None:
    event = _embedding_event()
    wire = event.model_dump_json()
    back = OUTBOUND_EVENT_ADAPTER.validate_json(wire, strict=True)
    assert back == event
    assert back.idempotency_key == ("conv-42", 7)
    vector = decode_vector(back.vector)
    assert vector.dtype == np.float32
    assert vector.tobytes() == np.array([0.6, -0.8, 0.0, -0.0], dtype=np.float32).tobytes()
    expected_vector = {"dtype": "f32", "dim": 4, "b64": "mpkZP83MTL8AAAAAAAAAgA=="}
    assert json.loads(wire)["vector"] == expected_vector


def test_embedding_event_checks() -> None:
    with pytest.raises(ValidationError, match="does not match"):
        _embedding_event(dim=3)
    with pytest.raises(ValidationError):
        _embedding_event(memory_len=-1)
    with pytest.raises(ValidationError):
        _embedding_event(produced_at=datetime(2024, 1, 1))  # naive
    with pytest.raises(ValidationError):
        StageTimings(queue_ms=float("inf"), step_ms=1, checkpoint_ms=1)
    with pytest.raises(ValidationError):
        SourceRef(topic="turns", partition=-1, offset=0)


def test_conversation_deleted_round_trip() -> None:
    event = ConversationDeleted(conversation_id="conv-42", deleted_through_seq=7, at=T0)
    wire = event.model_dump_json()
    assert wire == (
        '{"type":"conversation_deleted","schema_version":1,"conversation_id":"conv-42",'
        '"deleted_through_seq":7,"at":"2024-05-01T12:30:15.250000Z","tenant":null}'
    )
    assert OUTBOUND_EVENT_ADAPTER.validate_json(wire, strict=True) == event
    nothing = ConversationDeleted(conversation_id="c", deleted_through_seq=None, at=T0)
    assert OUTBOUND_EVENT_ADAPTER.validate_json(nothing.model_dump_json()) == nothing


# --------------------------------------------------------------------------- query API


def test_query_request_defaults_and_bounds() -> None:
    request = QueryRequest.model_validate_json('{"conversation_id":"c","query":"where were we?"}')
    assert request.k == 5
    assert QueryRequest.model_validate_json(request.model_dump_json()) == request
    bad_requests = ({"query": ""}, {"query": "q", "k": 0}, {"query": "q", "k": 101}, {"query": "q" * 8193})
    for bad in bad_requests:
        with pytest.raises(ValidationError):
            QueryRequest(conversation_id="c", **bad)


def test_query_response_round_trip() -> None:
    vector = encode_vector(np.array([1.0, 0.0], dtype=np.float32), dtype="f16")
    common = dict(conversation_id="c", vector=vector, dim=2, memory_len=0, checkpoint="sha256:00", model="m")
    found = [SearchHit(seq=3, score=0.91, text="Paris."), SearchHit(seq=1, score=0.2)]
    for hits in (None, [], found):
        response = QueryResponse(**common, applied_seq=-1, hits=hits)
        wire = response.model_dump_json()
        assert QueryResponse.model_validate_json(wire, strict=True) == response
    with pytest.raises(ValidationError):
        QueryResponse(**common, applied_seq=-2)
    with pytest.raises(ValidationError, match="does not match"):
        QueryResponse(**{**common, "dim": 3}, applied_seq=0)
    with pytest.raises(ValidationError):
        SearchHit(seq=0, score=float("nan"))


# --------------------------------------------------------------------------- dead letters


def _dead_letter(**overrides: object) -> DeadLetterEvent:
    fields: dict = dict(
        reason_code=DeadLetterReason.INVALID_JSON,
        reason="invalid JSON: Expecting value: line 1 column 1 (char 0)",
        original_key_b64=base64.b64encode(b"conv-42").decode(),
        original_value_b64=base64.b64encode(b"\xff\x00not json").decode(),
        topic="turns",
        partition=3,
        offset=99,
        timestamp_ms=1714566615250,
        failed_at=T0,
        worker="worker-1",
    )
    fields.update(overrides)
    return DeadLetterEvent(**fields)


@pytest.mark.parametrize("code", list(DeadLetterReason))
def test_dead_letter_round_trip_for_every_reason(code: DeadLetterReason) -> None:
    event = _dead_letter(reason_code=code)
    back = DeadLetterEvent.model_validate_json(event.model_dump_json(), strict=True)
    assert back == event and back.reason_code is code
    assert back.original_key() == b"conv-42" and back.original_value() == b"\xff\x00not json"


def test_dead_letter_null_vs_empty_originals() -> None:
    event = _dead_letter(original_key_b64=None, original_value_b64="")
    assert event.original_key() is None and event.original_value() == b""
    with pytest.raises(ValidationError):
        _dead_letter(original_value_b64="not base64!")


def test_dead_letter_reason_is_truncated_to_2k_of_valid_utf8() -> None:
    event = _dead_letter(reason="é" * 5000 + "\ud800")
    assert len(event.reason.encode("utf-8")) <= MAX_REASON_BYTES
    assert event.reason.endswith("[truncated]")
    short = _dead_letter(reason="bad \ud800 surrogate")  # must stay serialisable
    assert "\\ud800" in short.reason
    DeadLetterEvent.model_validate_json(short.model_dump_json())


def test_dead_letter_size_bound_holds_for_worst_case() -> None:
    max_record = 10_000
    event = _dead_letter(
        reason="\x01" * 10_000,  # every char JSON-escaped to 6 bytes
        original_key_b64=base64.b64encode(b"\xff" * 100).decode(),
        original_value_b64=base64.b64encode(b"\xff" * (max_record - 100)).decode(),
        topic="t" * 249,
        worker="w" * 256,
        offset=2**63 - 1,
        timestamp_ms=-(2**63),
    )
    assert len(event.model_dump_json().encode()) <= dead_letter_size_bound(max_record)


@pytest.mark.parametrize(
    "model, payload",
    [
        (TurnEventV1, json.loads(TURN_JSON)),
        (EmbeddingEvent, json.loads(_embedding_event().model_dump_json())),
        (QueryRequest, {"conversation_id": "c", "query": "q"}),
        (DeadLetterEvent, json.loads(_dead_letter().model_dump_json())),
    ],
)
def test_unknown_fields_are_errors(model: type, payload: dict) -> None:
    model.model_validate(payload)
    with pytest.raises(ValidationError, match="Extra inputs"):
        model.model_validate({**payload, "unexpected": 1})


# --------------------------------------------------------------------------- vectors


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
    )
)
def test_f32_round_trip_is_bit_exact(vector: np.ndarray) -> None:
    encoded = encode_vector(vector)
    wire = EncodedVector.model_validate_json(encoded.model_dump_json(), strict=True)
    decoded = decode_vector(wire)
    assert decoded.dtype == np.float32 and decoded.shape == vector.shape
    assert decoded.view(np.uint32).tolist() == vector.view(np.uint32).tolist()


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1, 1, width=32)))
def test_f16_round_trip_is_close_and_half_the_size(vector: np.ndarray) -> None:
    encoded = encode_vector(vector, dtype="f16")
    assert len(base64.b64decode(encoded.b64)) == 2 * vector.shape[0]
    decoded = decode_vector(encoded)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, vector, rtol=1e-3, atol=1e-4)
    assert decoded.tobytes() == vector.astype(np.float16).astype(np.float32).tobytes()


def test_vector_wire_layout_is_little_endian_base64() -> None:
    encoded = encode_vector(np.array([1.0, -2.0], dtype=np.float32))
    assert encoded.model_dump() == {"dtype": "f32", "dim": 2, "b64": "AACAPwAAAMA="}
    big_endian = np.array([1.0, -2.0], dtype=">f4")
    assert encode_vector(big_endian) == encoded
    assert encode_vector(np.array([1.0, -2.0], dtype=np.float64)) == encoded


def test_decoded_vector_is_writable_native_float32() -> None:
    decoded = decode_vector(encode_vector(np.ones(3, dtype=np.float32), dtype="f16"))
    decoded[0] = 5.0
    assert decoded.dtype == np.dtype(np.float32) and decoded.flags.writeable


@pytest.mark.parametrize("payload_bytes", [0, 12, 15, 17, 20])
def test_corrupt_length_is_rejected(payload_bytes: int) -> None:
    b64 = base64.b64encode(b"\x00" * payload_bytes).decode()
    with pytest.raises(ValidationError, match="needs 16"):
        EncodedVector(dtype="f32", dim=4, b64=b64)
    unchecked = EncodedVector.model_construct(dtype="f32", dim=4, b64=b64)
    with pytest.raises(ValueError, match="needs 16"):
        decode_vector(unchecked)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dtype": "f32", "dim": 1, "b64": base64.b64encode(np.float32("nan").tobytes()).decode()},
         "vector contains NaN or infinite values"),
        ({"dtype": "f16", "dim": 1, "b64": base64.b64encode(np.float16("inf").tobytes()).decode()},
         "vector contains NaN or infinite values"),
        ({"dtype": "f32", "dim": 1, "b64": "AAAA AA=="}, "vector b64 is not valid base64"),
        ({"dtype": "f32", "dim": 1, "b64": "AAAAAA="}, "vector b64 is not valid base64"),
        ({"dtype": "f64", "dim": 1, "b64": "AAAAAAAAAAA="}, "unknown vector dtype 'f64'"),
        ({"dtype": "f32", "dim": 0, "b64": ""}, r"vector dim must be an int in 1\.\.65536, got 0"),
        ({"dtype": "f32", "dim": MAX_DIM + 1, "b64": ""}, rf"vector dim must be an int in 1\.\.65536, got {MAX_DIM + 1}"),
        ({"dtype": "f32", "dim": 1, "b64": "AAAAAA==", "extra": 1}, None),
    ],
)
def test_corrupt_vectors_are_rejected(fields: dict, message: str | None) -> None:
    with pytest.raises(ValidationError):
        EncodedVector.model_validate(fields)
    if "extra" not in fields:
        with pytest.raises(ValueError, match=message):
            decode_vector(EncodedVector.model_construct(**fields))


@pytest.mark.parametrize(
    "vector, dtype, message",
    [
        (np.array([1.0, np.nan], dtype=np.float32), "f32", "cannot encode a vector containing NaN or infinite values"),
        (np.array([np.inf], dtype=np.float32), "f32", "cannot encode a vector containing NaN or infinite values"),
        (np.array([1e5], dtype=np.float32), "f16", "vector values overflow f16"),  # overflows binary16
        (np.zeros((2, 2), dtype=np.float32), "f32", r"expected a 1-D vector, got shape \(2, 2\)"),
        (np.array([1, 2, 3]), "f32", "expected a floating-point vector, got dtype int"),
        (np.array([1.0], dtype=np.float32), "f64", "unknown vector dtype 'f64'"),
    ],
)
def test_encode_refuses_what_cannot_be_encoded_faithfully(vector: np.ndarray, dtype: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_vector(vector, dtype=dtype)  # type: ignore[arg-type]
