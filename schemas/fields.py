"""The field types every wire event shares: bounds on sizes, ids, timestamps, metadata, and
the validators behind them (why each rule exists is said where it is defined)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1
MAX_SEQ = 2**53
"""Largest seq: the largest integer every JSON consumer (including JavaScript) reads exactly."""
MAX_CONVERSATION_ID_CHARS = 256
MAX_TENANT_CHARS = 128
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_STR_CHARS = 256
MAX_QUERY_CHARS = 8192
MAX_NAME_CHARS = 256
MAX_TOPIC_CHARS = 249
"""Kafka's own limit on topic names."""
MAX_REASON_BYTES = 2048
"""Dead-letter `reason` is cut to this many UTF-8 bytes; the original bytes carry the rest."""

# C0 + DEL + C1 controls (Unicode category Cc) and lone surrogates (Cs). Surrogates matter
# because a str holding one cannot be encoded to UTF-8, so it could not become a Kafka key
# or a Redis key later on.
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _no_control_chars(value: str) -> str:
    match = _CONTROL_OR_SURROGATE.search(value)
    if match:
        raise PydanticCustomError(
            "control_character",
            "must not contain control characters or lone surrogates (found {char} at {pos})",
            {"char": f"U+{ord(match.group()):04X}", "pos": match.start()},
        )
    return value


def _truncate_reason(value: object) -> object:
    """Cut a reason to MAX_REASON_BYTES of valid UTF-8 instead of rejecting it: a dead letter
    must always be buildable, whatever an exception message happened to contain."""
    if not isinstance(value, str):
        return value
    raw = value.encode("utf-8", "backslashreplace")  # also neutralises lone surrogates
    if len(raw) <= MAX_REASON_BYTES:
        return raw.decode("utf-8")
    marker = " ...[truncated]"
    head = raw[: MAX_REASON_BYTES - len(marker)].decode("utf-8", "ignore")  # drop a cut char
    return head + marker


_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_only(value: object) -> object:
    """Accept datetimes and ISO 8601 / RFC 3339 strings only.

    Pydantic would also read numbers and numeric strings as Unix time, guessing seconds vs
    milliseconds from the magnitude: a guess we do not want to make about a producer's
    clock. Parsing here (rather than leaving strings to pydantic) also keeps the rule the
    same in strict-JSON decoding and in lax Python construction.
    """
    if isinstance(value, (int, float)):
        raise PydanticCustomError("iso_datetime", "timestamps must be ISO 8601 strings, not numbers")
    if isinstance(value, str):
        if len(value) > 64 or not _ISO_DATETIME.match(value):
            raise PydanticCustomError(
                "iso_datetime",
                "timestamps must be ISO 8601 date-times with an offset, e.g. 2024-05-01T12:00:00Z",
            )
        try:
            return datetime.fromisoformat(value.upper())  # RFC 3339 allows "t" and "z"
        except ValueError as exc:
            raise PydanticCustomError(
                "iso_datetime", "invalid ISO 8601 timestamp: {error}", {"error": str(exc)}
            ) from None
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_only)]
"""Timezone-aware; ISO 8601 on the wire (UTC is serialised with a trailing Z)."""

MAX_EPOCH_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z, the last instant an ISO 8601 year of four digits can write."""


EPOCH_SECONDS_BELOW = 10**11
"""Inbound epoch numbers below this are seconds (up to the year 5138), from it on milliseconds
(from 1973-03-03): the two ranges cover every instant of this century exactly once."""


def _iso_or_epoch(value: object) -> object:
    """Inbound timestamps (issue #13, #17): ISO 8601 strings as before, or an integer Unix epoch
    in seconds or milliseconds, told apart by magnitude (EPOCH_SECONDS_BELOW). Why not
    milliseconds only: producers written in Python and Go often send `time.time()`-style
    seconds; read as milliseconds they landed in January 1970 without a word. No event of
    1970-1973 is written in milliseconds, so the rule is never ambiguous in practice. Only
    integers: a float or a numeric string stays an error."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_EPOCH_MS:
            raise PydanticCustomError(
                "epoch_range", "epoch timestamps must be within 0..{max}", {"max": MAX_EPOCH_MS})
        ms = value * 1000 if value < EPOCH_SECONDS_BELOW else value
        return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).replace(microsecond=(ms % 1000) * 1000)
    return _iso_only(value)


InboundTimestamp = Annotated[
    AwareDatetime,
    BeforeValidator(_iso_or_epoch),
    WithJsonSchema({"anyOf": [
        {"type": "string", "format": "date-time", "description": "ISO 8601 with an offset"},
        {"type": "integer", "minimum": 0, "maximum": MAX_EPOCH_MS,
         "description": "Unix epoch: seconds below 10**11, milliseconds from 10**11 on (UTC)"},
    ]}, mode="validation"),
]
"""Timezone-aware; ISO 8601 with an offset, or an integer Unix epoch in seconds or milliseconds
(by magnitude, EPOCH_SECONDS_BELOW)."""

ConversationId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_CONVERSATION_ID_CHARS),
    AfterValidator(_no_control_chars),
]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
"""Per-conversation turn number, starting at 0."""
Tenant = Annotated[
    str, Field(min_length=1, max_length=MAX_TENANT_CHARS), AfterValidator(_no_control_chars)
]
MetadataKey = Annotated[
    str, Field(min_length=1, max_length=MAX_METADATA_KEY_CHARS), AfterValidator(_no_control_chars)
]


def _not_an_int(value: object) -> object:
    """Keep JSON integers out of the float branch: otherwise an out-of-range int (rejected by
    the int branch) would be silently accepted as a rounded float."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise PydanticCustomError("int_as_float", "integers must be within +-2**53")
    return value


MetadataValue = (
    Annotated[str, Field(max_length=MAX_METADATA_STR_CHARS)]
    | Annotated[int, Field(ge=-MAX_SEQ, le=MAX_SEQ)]
    | Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_an_int)]
    | bool
    | None
)
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Millis = Annotated[float, Field(ge=0, allow_inf_nan=False)]
ReasonText = Annotated[str, BeforeValidator(_truncate_reason)]
"""Human-readable detail, silently cut to MAX_REASON_BYTES."""
