"""decode_inbound: one example per reason code, check ordering, and hypothesis properties
(never raises; valid events round-trip; hostile records get exactly the expected code)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream.processing.decode as decode_module
from schemas.events import (
    MAX_SEQ,
    ConversationDelete,
    DeadLetterEvent,
    DeadLetterReason,
    TurnEvent,
)
from stream.processing.dead_letters import Rejection, make_dead_letter
from stream.processing.decode import MAX_DEPTH_LIMIT, decode_inbound, nesting_depth

# `tests` is a namespace package under `python -m pytest` (cwd on sys.path); plain `pytest`
# puts tests/ itself on the path instead.
from strategies import (
    KNOWN_ROLES,
    strict_only_records,
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


def decode(key: bytes | None, value: bytes | None, *, strict: bool = False, **limits: int):
    max_bytes = limits.get("max_bytes", MAX_BYTES)
    max_depth = limits.get("max_depth", MAX_DEPTH)
    return decode_inbound(key, value, max_bytes=max_bytes, max_depth=max_depth, strict=strict)


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
    ("content part without a type", b"conv-1", raw(turn(messages=[{"role": "user", "content": [{"text": "x"}]}])),
     R.SCHEMA_VIOLATION),
    ("float epoch timestamp", b"conv-1", raw(turn(timestamp=1714564800000.5)), R.SCHEMA_VIOLATION),
    ("negative epoch timestamp", b"conv-1", raw(turn(timestamp=-1)), R.SCHEMA_VIOLATION),
    ("naive timestamp", b"conv-1", raw(turn(timestamp="2024-05-01T12:00:00")), R.SCHEMA_VIOLATION),
    ("roles out of order", b"conv-1", raw(turn(messages=msgs(("assistant", "a"), ("user", "b")))),
     R.SCHEMA_VIOLATION),
    ("unknown role", b"conv-1", raw(turn(messages=msgs(("robot", "beep")))), R.UNKNOWN_ROLE),
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
@pytest.mark.parametrize("strict", [False, True], ids=["tolerant", "strict"])
def test_decoder_example(
    key: bytes | None, value: bytes | None, expected: DeadLetterReason, strict: bool
) -> None:
    result = decode(key, value, strict=strict)
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
                    R.FINGERPRINT_MISMATCH, R.TENANT_MISMATCH, R.LATE_TURN, R.CONFLICTING_DUPLICATE]


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
    result = decode(b"conv-1", raw(turn(seq=-1, extra=1)), strict=True)
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
    for limits, message in (({"max_bytes": 0}, "max_bytes must be a positive int, got 0"),
                            ({"max_depth": 0}, r"max_depth must be an int in 1\.\.128, got 0"),
                            ({"max_depth": MAX_DEPTH_LIMIT + 1}, rf"max_depth must be an int in 1\.\.128, got {MAX_DEPTH_LIMIT + 1}")):
        with pytest.raises(ValueError, match=message):
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
        got = [(m.role, m.content) for m in decoded.to_turn_input().messages]
        assert got == [(m.role, m.content) for m in event.messages]


@PROPERTY
@given(hostile_records())
def test_hostile_records_get_the_expected_reason(
    record: tuple[bytes | None, bytes | None, DeadLetterReason | None],
) -> None:
    key, value, expected = record
    for strict in (False, True):  # the same outcome in both readers
        result = decode(key, value, strict=strict)
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


# --------------------------------------------------------------------------- tolerant reader (issue #13)

CHAT_FORMAT_EXAMPLES: list[tuple[str, dict, list[tuple[str, str]]]] = [
    # name, turn fields, what the model reads: [(role, text)]
    ("extra top-level field", {"channel_id": "web-7"}, [("user", "hi"), ("assistant", "hello")]),
    ("extra message field (OpenAI name)", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
     [("user", "hi")]),
    ("system message first", {"messages": msgs(("system", "be nice"), ("user", "hi"), ("assistant", "hello"))},
     [("user", "hi"), ("assistant", "hello")]),
    ("developer message", {"messages": msgs(("developer", "terse"), ("user", "hi"))}, [("user", "hi")]),
    ("epoch millisecond timestamp", {"timestamp": 1714564800123}, [("user", "hi"), ("assistant", "hello")]),
    ("assistant tool call, tool result, answer", {"messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees."}]},
     [("user", "weather in Paris?"), ("assistant", "It is 21 degrees.")]),
    ("legacy function result", {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "function", "name": "calc", "content": "4"},
        {"role": "assistant", "content": "4"}]}, [("user", "2+2?"), ("assistant", "4")]),
    ("content parts", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "this?"}]}]}, [("user", "what is\nthis?")]),
    ("two user messages", {"messages": msgs(("user", "hi"), ("user", "again"), ("assistant", "yes"))},
     [("user", "hi\nagain"), ("assistant", "yes")]),
]


@pytest.mark.parametrize("fields, reads", [c[1:] for c in CHAT_FORMAT_EXAMPLES], ids=[c[0] for c in CHAT_FORMAT_EXAMPLES])
def test_common_chat_shapes_are_accepted_and_mapped(fields: dict, reads: list[tuple[str, str]]) -> None:
    result = decode(b"conv-1", raw(turn(**fields)))
    assert isinstance(result, TurnEvent), result
    assert result.has_text
    assert [(m.role, m.content) for m in result.to_turn_input().messages] == reads
    # ... and each of them is exactly what strict mode (the version-1 contract) still refuses.
    assert isinstance(decode(b"conv-1", raw(turn(**fields)), strict=True), Rejection)


def test_plain_v1_turn_is_read_identically_by_both_readers() -> None:
    value = raw(turn(tenant="acme", metadata={"n": 1}))
    tolerant, strict = decode(b"conv-1", value), decode(b"conv-1", value, strict=True)
    assert isinstance(tolerant, TurnEvent) and tolerant == strict
    assert tolerant.unknown_fields == () and tolerant.unread_roles == ()
    assert tolerant.model_dump_json().encode() == TurnEvent.model_validate_json(value).model_dump_json().encode()


def test_unknown_fields_are_kept_and_named() -> None:
    msg = {"role": "user", "content": "hi", "x_lang": "fr", "name": "bob"}
    result = decode(b"conv-1", raw(turn(channel_id="web-7", priority={"level": 2}, messages=[msg])))
    assert isinstance(result, TurnEvent)
    assert set(result.unknown_fields) == {"channel_id", "priority", "messages[0].x_lang"}
    assert result.model_extra == {"channel_id": "web-7", "priority": {"level": 2}}
    # Kept: re-serialising the event gives them back to whoever reads it next.
    again = json.loads(result.model_dump_json())
    assert again["channel_id"] == "web-7" and again["messages"][0]["x_lang"] == "fr"
    assert again["messages"][0]["name"] == "bob"


def test_epoch_milliseconds_are_utc_and_exact() -> None:
    result = decode(b"conv-1", raw(turn(timestamp=1714564800123)))
    assert result.timestamp == datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)
    assert decode(b"conv-1", raw(turn(timestamp=0))).timestamp == datetime(1970, 1, 1, tzinfo=timezone.utc)
    for bad in ("1714564800123", 1714564800123.0, True, 10**16):
        assert decode(b"conv-1", raw(turn(timestamp=bad))).reason_code is R.SCHEMA_VIOLATION, bad


def test_turn_with_only_unread_roles_is_valid_without_text() -> None:
    result = decode(b"conv-1", raw(turn(messages=msgs(("system", "You are a helpful assistant.")))))
    assert isinstance(result, TurnEvent) and not result.has_text and result.unread_roles == ("system",)
    with pytest.raises(ValueError, match="List should have at least 1 item"):
        result.to_turn_input()
    # Nothing at all in any message is still an empty turn, whatever the roles.
    assert decode(b"conv-1", raw(turn(messages=msgs(("system", " "), ("user", ""))))).reason_code is R.EMPTY_TURN
    assert decode(b"conv-1", raw(turn(messages=[{"role": "assistant", "content": None}]))).reason_code is R.EMPTY_TURN


def test_turn_order_still_enforced_over_read_roles() -> None:
    for roles in ((("assistant", "a"), ("user", "b")), (("user", "a"), ("assistant", "b"), ("user", "c"))):
        assert decode(b"conv-1", raw(turn(messages=msgs(*roles)))).reason_code is R.SCHEMA_VIOLATION
    # Unread roles may sit anywhere (a tool result between the call and the answer).
    assert isinstance(decode(b"conv-1", raw(turn(messages=msgs(("user", "a"), ("tool", "t"), ("assistant", "b"))))),
                      TurnEvent)


def test_every_known_role_is_accepted() -> None:
    for role in KNOWN_ROLES:
        result = decode(b"conv-1", raw(turn(messages=msgs(("user", "hi"), (role, "text")))))
        assert isinstance(result, TurnEvent), (role, result)


@PROPERTY
@given(strict_only_records())
def test_strict_only_shapes(record: tuple[bytes, bytes, DeadLetterReason]) -> None:
    key, value, reason = record
    assert isinstance(decode(key, value), TurnEvent)
    result = decode(key, value, strict=True)
    assert isinstance(result, Rejection) and result.reason_code is reason, result


# --------------------------------------------------------------------------- Confluent framing (issue #13)


def _framed(payload: bytes, schema_id: int = 7) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + payload


def test_confluent_framed_value_and_key_are_unwrapped() -> None:
    value = raw(turn())
    for key in (b"conv-1", _framed(b'"conv-1"')):
        result = decode(key, _framed(value, 100_001))
        assert isinstance(result, TurnEvent) and result == decode(b"conv-1", value), result
    # Framing is transport, not schema: strict mode reads it too.
    assert isinstance(decode(b"conv-1", _framed(value), strict=True), TurnEvent)


def test_confluent_framing_does_not_hide_bad_payloads() -> None:
    assert decode(b"conv-1", _framed(b"not json")).reason_code is R.INVALID_JSON
    assert decode(b"conv-1", _framed(b"\xff")).reason_code is R.INVALID_UTF8
    assert decode(b"conv-1", b"\x00\x00").reason_code is R.INVALID_JSON  # too short to be framing
    assert decode(b"conv-2", _framed(raw(turn()))).reason_code is R.KEY_MISMATCH
    dead = make_dead_letter(decode(b"conv-1", _framed(b"{")), b"conv-1", _framed(b"{"), "turns", 0, 1, None, "w")
    assert dead.original_value() == _framed(b"{")  # the exact original bytes, framing included
