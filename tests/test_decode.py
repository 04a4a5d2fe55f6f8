"""decode_inbound: one example per reason code, check ordering, and hypothesis properties
(never raises; valid events round-trip; hostile records get exactly the expected code)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream.decode as decode_module
from schemas.events import (
    MAX_SEQ,
    ConversationDelete,
    DeadLetterEvent,
    DeadLetterReason,
    TurnEvent,
)
from stream.decode import (
    MAX_DEPTH_LIMIT,
    Rejection,
    decode_inbound,
    make_dead_letter,
    nesting_depth,
)

# `tests` is a namespace package under `python -m pytest` (cwd on sys.path); plain `pytest`
# puts tests/ itself on the path instead.
from strategies import (
    DECODER_REASONS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DEPTH,
    MUTATIONS,
    encode_record,
    fuzzed_records,
    hostile_records,
    valid_inbound_events,
)

R = DeadLetterReason
MAX_BYTES = DEFAULT_MAX_BYTES
MAX_DEPTH = DEFAULT_MAX_DEPTH
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode(key: bytes | None, value: bytes | None, **limits: int):
    max_bytes = limits.get("max_bytes", MAX_BYTES)
    max_depth = limits.get("max_depth", MAX_DEPTH)
    return decode_inbound(key, value, max_bytes=max_bytes, max_depth=max_depth)


def turn(**overrides: object) -> dict:
    document = {
        "type": "turn",
        "conversation_id": "conv-1",
        "seq": 0,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "timestamp": "2024-05-01T12:00:00Z",
    }
    document.update(overrides)
    return document


def raw(document: object) -> bytes:
    return json.dumps(document).encode()


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


DELETE = {"type": "delete", "conversation_id": "conv-1", "timestamp": "2024-05-01T12:00:00Z"}
LONE_SURROGATE = raw(turn(tenant="__S__")).replace(b'"__S__"', b'"\\ud800"')


# --------------------------------------------------------------------------- examples

DECODER_EXAMPLES: list[tuple[str, bytes | None, bytes | None, DeadLetterReason]] = [
    ("null value (tombstone)", b"conv-1", None, R.INVALID_JSON),
    ("empty value", b"conv-1", b"", R.INVALID_JSON),
    ("syntax error", b"conv-1", b'{"type": "turn",', R.INVALID_JSON),
    ("NaN constant", b"conv-1", raw(turn())[:-1] + b', "metadata": {"x": NaN}}', R.INVALID_JSON),
    ("duplicate names", b"conv-1", raw(turn())[:-1] + b', "seq": 1}', R.INVALID_JSON),
    ("top-level array", b"conv-1", b"[1, 2]", R.INVALID_JSON),
    ("unpaired surrogate", b"conv-1", LONE_SURROGATE, R.INVALID_JSON),
    ("bad UTF-8", b"conv-1", b'{"type": "turn", "x": "\xff"}', R.INVALID_UTF8),
    ("overlong UTF-8", b"conv-1", b'{"a": "\xc0\xaf"}', R.INVALID_UTF8),
    ("too deep", b"conv-1", b"[" * 100_000, R.TOO_DEEP),
    ("too large", b"conv-1", b"x" * (MAX_BYTES + 1), R.TOO_LARGE),
    ("wrong type for seq", b"conv-1", raw(turn(seq="0")), R.SCHEMA_VIOLATION),
    ("unknown field", b"conv-1", raw(turn(priority=1)), R.SCHEMA_VIOLATION),
    ("naive timestamp", b"conv-1", raw(turn(timestamp="2024-05-01T12:00:00")), R.SCHEMA_VIOLATION),
    ("roles out of order", b"conv-1", raw(turn(messages=msgs(("assistant", "a"), ("user", "b")))),
     R.SCHEMA_VIOLATION),
    ("unknown role", b"conv-1", raw(turn(messages=msgs(("system", "be nice")))), R.UNKNOWN_ROLE),
    ("empty turn", b"conv-1", raw(turn(messages=msgs(("user", "  "), ("assistant", "")))), R.EMPTY_TURN),
    ("key mismatch", b"conv-2", raw(turn()), R.KEY_MISMATCH),
    ("key not UTF-8", b"\xffconv-1", raw(turn()), R.KEY_MISMATCH),
    ("null key", None, raw(turn()), R.MISSING_KEY),
    ("empty key", b"", raw(turn()), R.MISSING_KEY),
    ("negative seq", b"conv-1", raw(turn(seq=-1)), R.SEQ_OUT_OF_RANGE),
    ("enormous seq", b"conv-1", raw(turn(seq=MAX_SEQ + 1)), R.SEQ_OUT_OF_RANGE),
    ("delete with negative seq", b"conv-1", raw({**DELETE, "seq": -5}), R.SEQ_OUT_OF_RANGE),
    ("missing type", b"conv-1", raw({k: v for k, v in turn().items() if k != "type"}),
     R.UNKNOWN_TYPE),
    ("outbound type on the inbound topic", b"conv-1", raw(turn(type="embedding")), R.UNKNOWN_TYPE),
    ("non-string type", b"conv-1", raw(turn(type=["turn"])), R.UNKNOWN_TYPE),
]


@pytest.mark.parametrize(
    "key, value, expected",
    [case[1:] for case in DECODER_EXAMPLES],
    ids=[case[0] for case in DECODER_EXAMPLES],
)
def test_decoder_example(
    key: bytes | None, value: bytes | None, expected: DeadLetterReason
) -> None:
    result = decode(key, value)
    assert isinstance(result, Rejection), result
    assert result.reason_code is expected, result.reason
    assert result.reason  # always says why


def test_processing_error_when_something_unexpected_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(_: bytes) -> int:
        raise RuntimeError("scanner bug")

    monkeypatch.setattr(decode_module, "nesting_depth", explode)
    result = decode(b"conv-1", b"[" * 100)
    assert isinstance(result, Rejection)
    assert result.reason_code is R.PROCESSING_ERROR and "scanner bug" in result.reason
    # Wrong argument types are a caller bug, but still must not escape the consumer loop.
    assert decode("conv-1", raw(turn())).reason_code is R.PROCESSING_ERROR  # type: ignore[arg-type]


PIPELINE_REASONS = [R.TURN_TOO_LONG, R.SEQ_GAP, R.PROCESSING_ERROR, R.CHECKPOINT_CORRUPT,
                    R.FINGERPRINT_MISMATCH, R.TENANT_MISMATCH]


@pytest.mark.parametrize("code", PIPELINE_REASONS)
def test_pipeline_reasons_become_dead_letters(code: DeadLetterReason) -> None:
    key, value = b"conv-1", raw(turn(seq=9))
    rejection = Rejection(reason_code=code, reason=f"{code.value}: detail from the pipeline")
    event = make_dead_letter(rejection, key, value, "turns", 2, 17, 1714564800000, "worker-a")
    back = DeadLetterEvent.model_validate_json(event.model_dump_json(), strict=True)
    assert back.reason_code is code
    assert (back.original_key(), back.original_value()) == (key, value)


def test_every_reason_code_has_an_example() -> None:
    from_decoder = {case[3] for case in DECODER_EXAMPLES}
    assert from_decoder == DECODER_REASONS
    assert from_decoder | set(PIPELINE_REASONS) == set(R)
    assert set(MUTATIONS) == DECODER_REASONS | {None}


def test_valid_turn_and_delete_decode() -> None:
    metadata = {"n": 1, "f": 0.5, "b": True, "z": None}
    result = decode(b"conv-1", raw(turn(tenant="acme", metadata=metadata)))
    assert isinstance(result, TurnEvent)
    assert result.timestamp == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert result.metadata == metadata
    delete = decode(b"conv-1", raw({**DELETE, "timestamp": "2024-05-01T12:00:00+02:00"}))
    assert isinstance(delete, ConversationDelete) and delete.seq is None
    # Kafka clients may hand out bytearray / memoryview.
    assert isinstance(decode(bytearray(b"conv-1"), memoryview(raw(turn()))), TurnEvent)


def test_check_order() -> None:
    # missing key before size; size before UTF-8; UTF-8 before depth; depth before JSON;
    # JSON before type; type before schema; schema before key.
    assert decode(None, b"\xff" * (MAX_BYTES + 1)).reason_code is R.MISSING_KEY
    assert decode(b"k", b"\xff" * (MAX_BYTES + 1)).reason_code is R.TOO_LARGE
    assert decode(b"k", b"[" * 100 + b"\xff").reason_code is R.INVALID_UTF8
    assert decode(b"k", b"[" * 100 + b"garbage").reason_code is R.TOO_DEEP
    assert decode(b"k", b'{"type": "nope", "x": NaN}').reason_code is R.INVALID_JSON
    assert decode(b"k", raw({"type": "nope", "seq": -1})).reason_code is R.UNKNOWN_TYPE
    assert decode(b"other", raw(turn(seq=-1))).reason_code is R.SEQ_OUT_OF_RANGE


def test_mixed_errors_are_a_schema_violation_listing_all() -> None:
    result = decode(b"conv-1", raw(turn(seq=-1, extra=1)))
    assert result.reason_code is R.SCHEMA_VIOLATION
    assert "seq" in result.reason and "extra" in result.reason


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    content = '[[[[{{{{\\"[[[[' * 5_000
    result = decode(b"conv-1", raw(turn(messages=[{"role": "user", "content": content}])))
    assert isinstance(result, TurnEvent) and result.messages[0].content == content


def test_depth_limit_is_exact() -> None:
    nested = {"type": "turn", "metadata": {"a": [[[]]]}}  # depth 5
    assert decode(b"k", raw(nested), max_depth=5).reason_code is R.SCHEMA_VIOLATION
    assert decode(b"k", raw(nested), max_depth=4).reason_code is R.TOO_DEEP


def test_hostile_depth_is_cheap() -> None:
    start = time.perf_counter()
    for value in (b"[" * 1_000_000, b'{"a":' * 200_000, b'"\\"' * 300_000 + b"[" * 1000):
        assert decode(b"k", value, max_bytes=2_000_000).reason_code in (R.TOO_DEEP, R.INVALID_JSON)
    assert time.perf_counter() - start < 5.0  # ~0.1 s normally; generous for a shared box


def test_invalid_settings_fail_fast() -> None:
    for limits in ({"max_bytes": 0}, {"max_depth": 0}, {"max_depth": MAX_DEPTH_LIMIT + 1}):
        with pytest.raises(ValueError):
            decode(b"k", b"{}", **limits)


def test_make_dead_letter_keeps_exact_bytes() -> None:
    key, value = b"\x00\xffconv", b"\xff" * (MAX_BYTES + 10)  # the decoder caps nothing here
    rejection = decode(key, value)
    at = datetime(2024, 5, 1, tzinfo=timezone.utc)
    event = make_dead_letter(rejection, key, value, "turns", 0, 5, -1, "w1", failed_at=at)
    assert event.reason_code is R.TOO_LARGE and event.timestamp_ms is None and event.failed_at == at
    back = DeadLetterEvent.model_validate_json(event.model_dump_json())
    assert back.original_key() == key and back.original_value() == value
    none = make_dead_letter(decode(None, None), None, None, "turns", 0, 6, 1, "w1")
    assert none.original_key() is None and none.original_value() is None
    assert none.failed_at.tzinfo is not None


# --------------------------------------------------------------------------- properties


def _assert_well_formed(result: object) -> None:
    assert isinstance(result, (TurnEvent, ConversationDelete, Rejection)), type(result)
    if isinstance(result, Rejection):
        assert result.reason_code in DeadLetterReason and result.reason


@PROPERTY
@given(key=st.none() | st.binary(max_size=16), value=st.none() | st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(key: bytes | None, value: bytes | None) -> None:
    result = decode(key, value, max_bytes=256, max_depth=8)
    _assert_well_formed(result)
    if isinstance(result, Rejection):
        dead = make_dead_letter(result, key, value, "turns", 0, 0, None, "w")
        assert (dead.original_key(), dead.original_value()) == (key, value)


@PROPERTY
@given(fuzzed_records())
def test_fuzzed_documents_never_raise(record: tuple[bytes | None, bytes]) -> None:
    _assert_well_formed(decode(*record))


@PROPERTY
@given(valid_inbound_events())
def test_valid_events_round_trip(event: TurnEvent | ConversationDelete) -> None:
    key, value = encode_record(event)
    decoded = decode(key, value)
    assert decoded == event
    if isinstance(decoded, TurnEvent):
        assert decoded.to_turn_input().messages == event.messages


@PROPERTY
@given(hostile_records())
def test_hostile_records_get_the_expected_reason(
    record: tuple[bytes | None, bytes | None, DeadLetterReason | None],
) -> None:
    key, value, expected = record
    result = decode(key, value)
    if expected is None:
        assert not isinstance(result, Rejection), result
    else:
        assert isinstance(result, Rejection), f"expected {expected}, decoded {result!r}"[:500]
        assert result.reason_code is expected, result.reason


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_hostile_records_honour_custom_limits(data: st.DataObject) -> None:
    max_bytes, max_depth = 20_000, 4
    key, value, expected = data.draw(hostile_records(max_bytes=max_bytes, max_depth=max_depth))
    result = decode(key, value, max_bytes=max_bytes, max_depth=max_depth)
    assert (result.reason_code if isinstance(result, Rejection) else None) is expected


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ a', max_size=6),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), inner, max_size=3),
    max_leaves=20,
)


def _reference_depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    return 0


@PROPERTY
@given(_JSON, st.booleans())
def test_nesting_depth_matches_a_parser(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert nesting_depth(text.encode()) == _reference_depth(value)
