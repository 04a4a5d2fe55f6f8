"""Raw Kafka record -> typed inbound event, or the reason it must be dead-lettered.

Why a separate, total function: the consumer loop must never die on a bad record (one poison
message would stall its whole partition), and the dead-letter topic is only useful if every
rejection says precisely what was wrong. So `decode_inbound` returns either an event or a
`Rejection`, never raises for any key/value, and checks in an order that goes from cheap to
expensive and never parses what it has not bounded first:

1. value null/absent            -> invalid_json (a null value is not a JSON document)
2. key null or empty            -> missing_key  (we could not route or order it)
3. len(value) > max_bytes       -> too_large    (before touching the content)
   Confluent wire framing (magic 0x00 + 4-byte schema id, as schema-registry serializers
   write it) is then stripped from the value (and from the key): JSON never starts with 0x00
4. strict UTF-8                 -> invalid_utf8
5. nesting depth > max_depth    -> too_deep     (linear scan, no recursion, before parsing)
6. JSON syntax                  -> invalid_json (also NaN/Infinity, duplicate names,
                                                 non-object top level, unpaired surrogates)
7. `type` missing or unknown    -> unknown_type
8. schema (strict JSON mode)    -> unknown_role | empty_turn | seq_out_of_range | schema_violation
9. key != body conversation_id  -> key_mismatch
Anything unexpected             -> processing_error

Step 8 is the tolerant reader (issue #13, `schemas.events.TurnEvent`): unknown fields are
accepted and kept on the event (`unknown_fields`), the roles and message shapes of the common
chat formats are accepted (`schemas.messages`), timestamps may be epoch milliseconds. With
`strict=True` a record must first satisfy the version-1 contract (`TurnEventV1`), which
rejects all of that exactly as before.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import ValidationError

from schemas.events import (
    INBOUND_EVENT_ADAPTER,
    INBOUND_EVENT_V1_ADAPTER,
    INBOUND_TYPES,
    ConversationDelete,
    DeadLetterReason,
    TurnEvent,
)
from stream.processing.dead_letters import Rejection

MAX_DEPTH_LIMIT = 128
"""Largest accepted `max_depth` setting. Valid events nest 3 deep; pydantic's JSON parser
stops at 200, and staying well below keeps the stdlib parser far from the recursion limit."""

_MAX_ERRORS_SHOWN = 8

CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_BYTES = 5
"""Magic byte 0 + big-endian 4-byte schema id, before the serialized payload."""

R = DeadLetterReason


DecodeResult = TurnEvent | ConversationDelete | Rejection


class _JsonRejected(ValueError):
    """Raised by json.loads hooks; caught and reported as invalid_json."""


def decode_inbound(
    key: bytes | None, value: bytes | None, *, max_bytes: int, max_depth: int, strict: bool = False
) -> DecodeResult:
    """Decode one record of the turns topic. Total over key/value: never raises for them.

    `max_bytes` bounds the value; `max_depth` bounds JSON nesting (1..MAX_DEPTH_LIMIT).
    Invalid settings raise ValueError: that is a deployment bug to fail fast on, not a record
    to dead-letter. `strict`: also require the version-1 contract (see the module docstring).
    """
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not isinstance(max_depth, int) or not 1 <= max_depth <= MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be an int in 1..{MAX_DEPTH_LIMIT}, got {max_depth!r}")
    try:
        return _decode(key, value, max_bytes, max_depth, strict)
    except Exception as exc:  # noqa: BLE001 - the point is that nothing escapes
        return Rejection(reason_code=R.PROCESSING_ERROR, reason=_describe_exception(exc))


def _decode(key: object, value: object, max_bytes: int, max_depth: int, strict: bool) -> DecodeResult:
    if value is None:
        return Rejection(reason_code=R.INVALID_JSON, reason="record value is null (tombstone)")
    if key is None or (isinstance(key, (bytes, bytearray, memoryview)) and len(key) == 0):
        return Rejection(
            reason_code=R.MISSING_KEY,
            reason="record has no key; turns must be keyed by conversation_id",
        )
    if not isinstance(value, (bytes, bytearray, memoryview)) or not isinstance(
        key, (bytes, bytearray, memoryview)
    ):
        raise TypeError(f"key/value must be bytes, got {type(key).__name__}/{type(value).__name__}")
    value = bytes(value)
    key = bytes(key)

    if len(value) > max_bytes:
        return Rejection(
            reason_code=R.TOO_LARGE, reason=f"value is {len(value)} bytes; limit is {max_bytes}"
        )
    value = strip_confluent_framing(value)
    key = _unframe_key(key)
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(
            reason_code=R.INVALID_UTF8,
            reason=f"value is not valid UTF-8: {exc.reason} at byte {exc.start}",
        )
    # Depth cannot exceed the number of opening brackets: the usual record (a handful) skips
    # the vectorised scan after two C-speed counts.
    openers = value.count(b"[") + value.count(b"{")
    if openers > max_depth and nesting_depth(value) > max_depth:
        return Rejection(
            reason_code=R.TOO_DEEP, reason=f"JSON nests deeper than the limit of {max_depth}"
        )
    try:
        document = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_unique_names
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and our hooks are ValueErrors
        return Rejection(reason_code=R.INVALID_JSON, reason=f"invalid JSON: {exc}")
    if not isinstance(document, dict):
        return Rejection(
            reason_code=R.INVALID_JSON,
            reason=f"top-level JSON value must be an object, got {_json_kind(document)}",
        )

    event_type = document.get("type")
    if not isinstance(event_type, str) or event_type not in INBOUND_TYPES:
        shown = "missing" if "type" not in document else _short_repr(event_type)
        return Rejection(
            reason_code=R.UNKNOWN_TYPE,
            reason=f"event type {shown}; expected one of {sorted(INBOUND_TYPES)}",
        )

    try:
        # Re-parse in pydantic's strict JSON mode rather than validating `document` (lax):
        # strict keeps "5" or 1.0 from becoming a seq. The cost is one more C-speed parse.
        if strict:  # the version-1 contract first: its errors are the ones to report
            INBOUND_EVENT_V1_ADAPTER.validate_json(value, strict=True)
        event = INBOUND_EVENT_ADAPTER.validate_json(value, strict=True)
    except ValidationError as exc:
        return _classify_validation_error(exc)

    try:
        key_text = key.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection(
            reason_code=R.KEY_MISMATCH,
            reason="record key is not valid UTF-8, so it cannot equal conversation_id",
        )
    if key_text != event.conversation_id:
        return Rejection(
            reason_code=R.KEY_MISMATCH,
            reason=(
                f"record key {_short_repr(key_text)} != conversation_id "
                f"{_short_repr(event.conversation_id)}"
            ),
        )
    return event


def strip_confluent_framing(value: bytes) -> bytes:
    """The payload of a value written by a schema-registry serializer (magic byte 0 + 4-byte
    schema id + JSON), else `value` unchanged. The schema id is not looked up: the event's
    own `type`/`schema_version` say what it is, and no registry is needed to read JSON."""
    if len(value) >= CONFLUENT_HEADER_BYTES and value[0] == CONFLUENT_MAGIC:
        return value[CONFLUENT_HEADER_BYTES:]
    return value


def _unframe_key(key: bytes) -> bytes:
    """A key written by a schema-registry JSON serializer is a framed JSON string
    (`\\x00<id>"c1"`): its payload string. Plain (string-serialized) keys are unchanged."""
    if len(key) <= CONFLUENT_HEADER_BYTES or key[0] != CONFLUENT_MAGIC:
        return key
    payload = key[CONFLUENT_HEADER_BYTES:]
    try:
        text = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return payload
    return text.encode("utf-8") if isinstance(text, str) else payload


def nesting_depth(raw: bytes) -> int:
    """Maximum `[`/`{` nesting depth of a JSON text, ignoring brackets inside strings.

    Linear time and constant stack, so it is safe on `[` * 10**6 where a recursive parser is
    not. Works on UTF-8 bytes directly: `"` and `\\` never occur inside a multi-byte sequence.
    A quote is escaped iff it is preceded by an odd run of backslashes. For invalid JSON the
    result may differ from any parse, but it is exact on the valid prefix a parser would
    consume, so it never under-reports the depth a parser could reach.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    n = data.shape[0]
    if n == 0:
        return 0
    index = np.arange(n, dtype=np.int32)
    backslash = data == 0x5C
    # Index of the last non-backslash at or before each position (-1 if none).
    last_plain = np.maximum.accumulate(np.where(backslash, -1, index))
    # Length of the backslash run ending right before position i.
    run_before = np.empty(n, dtype=np.int32)
    run_before[0] = 0
    run_before[1:] = index[:-1] - last_plain[:-1]
    quote = (data == 0x22) & (run_before % 2 == 0)
    quotes_before = np.cumsum(quote, dtype=np.int32) - quote
    outside = quotes_before % 2 == 0
    step = (
        ((data == 0x5B) | (data == 0x7B)).astype(np.int32)
        - ((data == 0x5D) | (data == 0x7D)).astype(np.int32)
    ) * outside
    return int(max(np.cumsum(step, dtype=np.int32).max(), 0))


def _reject_constant(name: str) -> object:
    raise _JsonRejected(f"{name} is not valid JSON (non-finite numbers are not allowed)")


def _unique_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Duplicate names are legal-ish JSON that parsers resolve differently (first vs last wins);
    # accepting them would let a record mean one thing to us and another to an auditor.
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        duplicates = sorted({name for name, _ in pairs if name in seen or seen.add(name)})
        raise _JsonRejected(f"duplicate object member names: {_short_repr(duplicates)}")
    return document


def _classify_validation_error(exc: ValidationError) -> Rejection:
    """Map pydantic errors to the most specific reason.

    A specific code is used only when *every* error maps to it: the code then names the whole
    problem. Mixed failures are a schema_violation; the reason lists all of them either way.
    """
    errors = exc.errors(include_url=False, include_input=False)
    codes = {_code_for(error) for error in errors}
    code = codes.pop() if len(codes) == 1 else R.SCHEMA_VIOLATION
    return Rejection(reason_code=code, reason=f"{code.value}: {_summarise(errors)}")


def _code_for(error: dict) -> DeadLetterReason:
    kind = error["type"]
    loc = tuple(error["loc"])[1:]  # drop the union tag ("turn" / "delete")
    if kind == "json_invalid":
        return R.INVALID_JSON
    if kind == "empty_turn":
        return R.EMPTY_TURN
    if kind == "literal_error" and len(loc) == 3 and loc[0] == "messages" and loc[2] == "role":
        return R.UNKNOWN_ROLE
    if loc == ("seq",) and kind in ("greater_than_equal", "less_than_equal"):
        return R.SEQ_OUT_OF_RANGE
    return R.SCHEMA_VIOLATION


def _summarise(errors: list) -> str:
    parts = []
    for error in errors[:_MAX_ERRORS_SHOWN]:
        loc = tuple(error["loc"])[1:]
        path = ".".join(str(part) for part in loc) or "<event>"
        parts.append(f"{path}: {error['msg']}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_exception(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not escape either
        detail = "<unprintable>"
    return f"unexpected {type(exc).__name__} while decoding: {detail}"


__all__ = [
    "DecodeResult",
    "MAX_DEPTH_LIMIT",
    "decode_inbound",
    "nesting_depth",
    "strip_confluent_framing",
]
