"""Hypothesis strategies for turns-topic records.

Shared by the decoder tests and the fault-injection suite, which mixes `hostile_records()` into
live traffic and then checks the dead-letter topic. That is why every hostile record carries
the *single* reason code the decoder must give it: the mutations are built so that exactly one
thing is wrong (and the record stays within the size/depth limits unless that is the point).

Public:
    conversation_ids(), valid_turn_events(), valid_delete_events(), valid_inbound_events()
    encode_record(event) -> (key, value)
    hostile_records(max_bytes=, max_depth=, reasons=) -> (key, value, expected reason | None)
        (the same outcome in the tolerant and the strict reader)
    strict_only_records() -> (key, value, reason): accepted by the tolerant reader only
    fuzzed_records() -> (key, value): structurally plausible junk, no expected outcome
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone

from hypothesis import strategies as st

from schemas.events import (
    MAX_SEQ,
    ConversationDelete,
    DeadLetterReason,
    TurnEvent,
)

R = DeadLetterReason
Record = tuple[bytes | None, bytes | None, DeadLetterReason | None]

DEFAULT_MAX_BYTES = 1 << 20
"""1 MiB, Kafka's default max.message.bytes: big enough for the classic '[' * 100000."""
DEFAULT_MAX_DEPTH = 16
MIN_MAX_BYTES = 16 * 1024
"""hostile_records needs room for a valid base event plus one mutation under the limit."""

DECODER_REASONS: frozenset[DeadLetterReason] = frozenset(R) - {
    R.TURN_TOO_LONG,
    R.SEQ_GAP,
    R.PROCESSING_ERROR,
    R.CHECKPOINT_CORRUPT,
    R.FINGERPRINT_MISMATCH,
    R.TENANT_MISMATCH,
    R.LATE_TURN,
    R.CONFLICTING_DUPLICATE,
}
"""Reasons the decoder gives for bad input (the rest come from the pipeline or from bugs)."""

_SAFE_CHARS = st.characters(exclude_categories=("Cc", "Cs"))
_TIMEZONES = [
    timezone.utc,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-7)),
    timezone(timedelta(hours=13, minutes=45)),
]
_WHITESPACE = " \t\n\r\u00a0\u2003\u3000"
_PLACEHOLDER = "__hostile_placeholder_7f3a__"
"""A string we put in a JSON document and then replace with raw, non-JSON-encodable text."""


# --------------------------------------------------------------------------- valid events


def conversation_ids() -> st.SearchStrategy[str]:
    """Realistic ASCII ids and arbitrary Unicode ones (no controls / lone surrogates)."""
    return st.one_of(
        st.from_regex(r"[a-z0-9][a-z0-9:_-]{0,40}", fullmatch=True),
        st.text(_SAFE_CHARS, min_size=1, max_size=48),
    )


def _tenants() -> st.SearchStrategy[str | None]:
    return st.none() | st.text(_SAFE_CHARS, min_size=1, max_size=16)


def _timestamps() -> st.SearchStrategy[datetime]:
    return st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from(_TIMEZONES),
    )


def _contents() -> st.SearchStrategy[str]:
    # The second alphabet stresses the bracket-depth scanner: brackets, quotes and
    # backslashes inside strings must not count as nesting.
    return st.one_of(
        st.text(max_size=200),
        st.text(alphabet='[]{}"\\ ab\n', max_size=120),
    )


def _non_blank_contents() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(min_size=1, max_size=200).filter(str.strip),
        st.from_regex(r"[\[\]{}\"\\a-z ]*[a-z][\[\]{}\"\\a-z ]*", fullmatch=True),
    )


def _metadata() -> st.SearchStrategy[dict]:
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-MAX_SEQ, MAX_SEQ),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=32),
    )
    return st.dictionaries(st.text(_SAFE_CHARS, min_size=1, max_size=16), values, max_size=4)


def _seqs() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 1000), st.integers(0, MAX_SEQ))


@st.composite
def valid_turn_events(draw: st.DrawFn) -> TurnEvent:
    roles = draw(st.sampled_from([("user",), ("assistant",), ("user", "assistant")]))
    anchor = draw(st.integers(0, len(roles) - 1))  # this message is guaranteed non-blank
    messages = [
        {"role": role, "content": draw(_non_blank_contents() if i == anchor else _contents())}
        for i, role in enumerate(roles)
    ]
    return TurnEvent(
        conversation_id=draw(conversation_ids()),
        seq=draw(_seqs()),
        messages=messages,
        timestamp=draw(_timestamps()),
        tenant=draw(_tenants()),
        metadata=draw(_metadata()),
    )


@st.composite
def valid_delete_events(draw: st.DrawFn) -> ConversationDelete:
    return ConversationDelete(
        conversation_id=draw(conversation_ids()),
        seq=draw(st.none() | _seqs()),
        timestamp=draw(_timestamps()),
        tenant=draw(_tenants()),
    )


def valid_inbound_events() -> st.SearchStrategy[TurnEvent | ConversationDelete]:
    return st.one_of(valid_turn_events(), valid_delete_events())


def encode_record(event: TurnEvent | ConversationDelete) -> tuple[bytes, bytes]:
    """The (key, value) a well-behaved producer publishes for `event`."""
    return event.conversation_id.encode("utf-8"), event.model_dump_json().encode("utf-8")


# --------------------------------------------------------------------------- hostile records
#
# Each mutation: (draw, limits) -> Record. `limits` = (max_bytes, max_depth).

Limits = tuple[int, int]
Mutation = Callable[[st.DrawFn, Limits], Record]


def _dumps(draw: st.DrawFn, document: object) -> bytes:
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8")


def _base(draw: st.DrawFn, turns_only: bool = False) -> tuple[bytes, dict]:
    event = draw(valid_turn_events() if turns_only else valid_inbound_events())
    return event.conversation_id.encode("utf-8"), event.model_dump(mode="json")


def _with_raw(draw: st.DrawFn, document: dict, raw: str) -> bytes:
    """Serialise `document` with the string _PLACEHOLDER replaced by raw JSON-ish text."""
    return _dumps(draw, document).replace(json.dumps(_PLACEHOLDER).encode(), raw.encode())


def _valid(draw: st.DrawFn, limits: Limits) -> Record:
    key, value = encode_record(draw(valid_inbound_events()))
    return key, value, None


def _invalid_utf8(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw)
    value = _dumps(draw, document)
    # Insert only at character boundaries: next to a continuation byte some of these
    # fragments could complete a valid sequence.
    boundaries = [i for i, b in enumerate(value) if b & 0xC0 != 0x80] + [len(value)]
    at = draw(st.sampled_from(boundaries))
    bad = draw(
        st.sampled_from(
            [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf5\x80\x80\x80"]
        )
    )
    return key, value[:at] + bad + value[at:], R.INVALID_UTF8


def _too_large(draw: st.DrawFn, limits: Limits) -> Record:
    max_bytes, _ = limits
    key, document = _base(draw, turns_only=True)
    extra = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        document["messages"][0]["content"] = "x" * (max_bytes + extra)
        value = _dumps(draw, document)
    else:  # size is checked before anything else, so even garbage is too_large
        value = b"\xff[" * ((max_bytes + extra) // 2 + 1)
    return key, value, R.TOO_LARGE


def _too_deep(draw: st.DrawFn, limits: Limits) -> Record:
    max_bytes, max_depth = limits
    key, document = _base(draw)
    room = max_bytes - len(json.dumps(document).encode()) - 64  # ASCII-escaped: the longest form
    depth = draw(
        st.one_of(
            st.integers(max_depth + 1, max_depth + 64),
            st.sampled_from([100_000, max_bytes // 3]),
        ).map(lambda n: max(max_depth + 1, min(n, room // 6)))
    )
    shape = draw(st.sampled_from(["arrays", "objects", "embedded", "unclosed"]))
    if shape == "arrays":
        value = b"[" * depth + b"]" * depth
    elif shape == "objects":
        value = b'{"a":' * depth + b"1" + b"}" * depth
    elif shape == "unclosed":
        value = b"[" * depth
    else:
        document["x"] = _PLACEHOLDER  # unknown field too, but depth is checked first
        value = _with_raw(draw, document, "[" * depth + "]" * depth)
    return key, value, R.TOO_DEEP


def _invalid_json(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw)
    text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    kind = draw(
        st.sampled_from(
            ["truncated", "trailing", "nonfinite", "duplicate", "top_level", "null", "empty",
             "surrogate", "bom", "python_repr"]
        )
    )
    value: bytes | None
    if kind == "truncated":  # every strict prefix of an object is unclosed
        value = text[: draw(st.integers(0, len(text) - 1))].encode()
    elif kind == "trailing":
        value = (text + draw(st.sampled_from([" x", "}", ",", "{}", " 1"]))).encode()
    elif kind == "nonfinite":
        document["x"] = _PLACEHOLDER
        value = _with_raw(draw, document, draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))
    elif kind == "duplicate":
        name = draw(st.sampled_from(["conversation_id", "type", "timestamp"]))
        value = (text[:-1] + f", {json.dumps(name)}: {json.dumps(document[name])}}}").encode()
    elif kind == "top_level":
        value = draw(st.sampled_from([b"[]", b"null", b"1", b'"turn"', b"true", b'[{"type": "turn"}]']))
    elif kind == "null":
        value = None
    elif kind == "empty":
        value = draw(st.sampled_from([b"", b" ", b"\n"]))
    elif kind == "surrogate":  # valid JSON grammar, but not Unicode text
        document["tenant"] = _PLACEHOLDER
        lone = draw(st.sampled_from(['"\\ud800"', '"a\\udfff"', '"\\ud83d"']))
        value = _with_raw(draw, document, lone)
    elif kind == "bom":
        value = b"\xef\xbb\xbf" + text.encode()
    else:
        value = repr(document).encode()
    return key, value, R.INVALID_JSON


def _unknown_type(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw)
    if draw(st.booleans()):
        del document["type"]
    else:
        document["type"] = draw(
            st.one_of(
                st.sampled_from(
                    ["embedding", "conversation_deleted", "dead_letter", "Turn", "DELETE", "",
                     " turn", 5, None, True, ["turn"], {"type": "turn"}]
                ),
                st.text(max_size=12).filter(lambda t: t not in ("turn", "delete")),
            )
        )
    return key, _dumps(draw, document), R.UNKNOWN_TYPE


def _schema_violation(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw, turns_only=True)
    message = document["messages"][0]
    field, bad = draw(
        st.sampled_from(
            [
                ("seq", "5"), ("seq", 1.5), ("seq", 2.0), ("seq", True), ("seq", None),
                ("seq", [1]), ("conversation_id", 5), ("conversation_id", None),
                ("conversation_id", ""), ("conversation_id", "a" * 257),
                ("conversation_id", "a\x01b"), ("conversation_id", "\x7f"),
                ("messages", []), ("messages", {"role": "user", "content": "x"}), ("messages", "hi"),
                ("messages", None), ("messages", ["hi"]),
                ("messages", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}]),
                ("messages", [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),
                ("messages", [{"role": "user"}]), ("messages", [{"content": "x"}]),
                ("messages", [{"role": "user", "content": 5}]),
                ("messages", [{"role": "user", "content": [{"text": "no part type"}]}]),
                ("messages", [{"role": "user", "content": "x", "name": 5}]),
                ("messages", [{"role": "assistant", "content": "x", "tool_calls": "call"}]),
                ("timestamp", "2024-01-01T00:00:00"), ("timestamp", -1), ("timestamp", 1.7e12),
                ("timestamp", 10**16), ("timestamp", "yesterday"),
                ("timestamp", "1714564800"), ("timestamp", "2024-05-01"),
                ("timestamp", None), ("timestamp", ""),
                ("schema_version", 0), ("schema_version", 2), ("schema_version", "1"),
                ("schema_version", None), ("tenant", 5), ("tenant", ""), ("tenant", "t" * 200),
                ("metadata", []), ("metadata", {str(i): i for i in range(33)}),
                ("metadata", {"a": {"b": 1}}), ("metadata", {"a": "v" * 300}),
                ("metadata", {"a": 2**60}), ("metadata", {"": 1}),
                ("@missing", "conversation_id"), ("@missing", "seq"), ("@missing", "messages"),
                ("@missing", "timestamp"),
            ]
        )
    )
    if field == "@missing":
        del document[bad]
    else:
        document[field] = bad
    return key, _dumps(draw, document), R.SCHEMA_VIOLATION


def _unknown_role(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw, turns_only=True)
    message = draw(st.sampled_from(document["messages"]))
    message["role"] = draw(
        st.one_of(
            st.sampled_from(["robot", "User", "ASSISTANT", "", 5, None, True, ["user"]]),
            st.text(max_size=12).filter(lambda r: r not in KNOWN_ROLES),
        )
    )
    return key, _dumps(draw, document), R.UNKNOWN_ROLE


KNOWN_ROLES = ("user", "assistant", "system", "developer", "tool", "function")
"""Roles of the common chat formats: accepted by the tolerant reader (issue #13)."""


@st.composite
def strict_only_records(draw: st.DrawFn) -> Record:
    """(key, value, reason) that the tolerant reader accepts but strict mode (the version-1
    contract) rejects with `reason`: unknown fields, the other chat roles, OpenAI-style
    message fields, content parts, several messages per side, epoch-millisecond timestamps."""
    key, document = _base(draw, turns_only=True)
    message = document["messages"][0]
    kind = draw(st.sampled_from(["extra", "extra_in_message", "name", "tool_calls", "parts", "two_users",
                                 "epoch_ms", "system", "tool", "developer"]))
    reason = R.SCHEMA_VIOLATION
    if kind == "extra":
        document[draw(st.text(min_size=1, max_size=12).map(lambda s: "x_" + s))] = draw(
            st.none() | st.integers(-10, 10) | st.text(max_size=8) | st.just({"nested": [1]}))
    elif kind == "extra_in_message":
        message["x_" + draw(st.text(max_size=8))] = 1
    elif kind == "name":
        message["name"] = "bob"
    elif kind == "tool_calls":
        document["messages"] = [{"role": "user", "content": "weather?"},
                                {"role": "assistant", "content": None,
                                 "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "get", "arguments": "{}"}}]}]
    elif kind == "parts":
        message["content"] = [{"type": "text", "text": message["content"]}]
    elif kind == "two_users":
        document["messages"] = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    elif kind == "epoch_ms":
        document["timestamp"] = draw(st.integers(0, 4_102_444_800_000))
    else:
        document["messages"] = [{"role": kind, "content": "context"}, {"role": "user", "content": "hi"}]
        reason = R.UNKNOWN_ROLE
    return key, _dumps(draw, document), reason


def _empty_turn(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw, turns_only=True)
    for message in document["messages"]:
        message["content"] = draw(st.text(alphabet=_WHITESPACE, max_size=6))
    return key, _dumps(draw, document), R.EMPTY_TURN


def _key_mismatch(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw)
    cid = document["conversation_id"]
    other = draw(
        st.one_of(
            conversation_ids().filter(lambda c: c != cid).map(lambda c: c.encode("utf-8")),
            st.just(b"\xff" + key),  # not UTF-8 at all
            st.just(key + b" "),
        )
    )
    return other, _dumps(draw, document), R.KEY_MISMATCH


def _missing_key(draw: st.DrawFn, limits: Limits) -> Record:
    _, document = _base(draw)
    return draw(st.sampled_from([None, b""])), _dumps(draw, document), R.MISSING_KEY


def _seq_out_of_range(draw: st.DrawFn, limits: Limits) -> Record:
    key, document = _base(draw)
    document["seq"] = draw(
        st.one_of(
            st.integers(max_value=-1, min_value=-(10**30)),
            st.integers(min_value=MAX_SEQ + 1, max_value=10**30),
            st.sampled_from([-1, MAX_SEQ + 1, 2**63, -(2**63)]),
        )
    )
    return key, _dumps(draw, document), R.SEQ_OUT_OF_RANGE


MUTATIONS: dict[DeadLetterReason | None, Mutation] = {
    None: _valid,
    R.INVALID_UTF8: _invalid_utf8,
    R.INVALID_JSON: _invalid_json,
    R.TOO_DEEP: _too_deep,
    R.TOO_LARGE: _too_large,
    R.SCHEMA_VIOLATION: _schema_violation,
    R.UNKNOWN_ROLE: _unknown_role,
    R.EMPTY_TURN: _empty_turn,
    R.KEY_MISMATCH: _key_mismatch,
    R.MISSING_KEY: _missing_key,
    R.SEQ_OUT_OF_RANGE: _seq_out_of_range,
    R.UNKNOWN_TYPE: _unknown_type,
}
"""Expected outcome -> generator. None = a valid record that must decode."""


def hostile_records(
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    reasons: Iterable[DeadLetterReason | None] | None = None,
) -> st.SearchStrategy[Record]:
    """(key, value, expected) where expected is the reason `decode_inbound(key, value,
    max_bytes=max_bytes, max_depth=max_depth)` must return, or None if it must decode.

    `reasons` restricts the mix (default: every decoder reason plus valid records). Pass the
    same limits the decoder under test runs with.
    """
    if max_bytes < MIN_MAX_BYTES:
        raise ValueError(f"hostile_records needs max_bytes >= {MIN_MAX_BYTES}")
    chosen = list(MUTATIONS) if reasons is None else list(dict.fromkeys(reasons))
    unknown = [r for r in chosen if r not in MUTATIONS]
    if unknown:
        raise ValueError(f"no generator for {unknown}; available: {list(MUTATIONS)}")
    limits = (max_bytes, max_depth)

    @st.composite
    def records(draw: st.DrawFn) -> Record:
        reason = draw(st.sampled_from(chosen))
        return MUTATIONS[reason](draw, limits)

    return records()


# --------------------------------------------------------------------------- fuzz


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@st.composite
def fuzzed_records(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """A valid event with a random field (top-level or in a message) replaced by, or added
    as, an arbitrary JSON value, under a key that may or may not match: reaches the schema
    checks with shapes nobody thought of. No expected outcome; for never-raises properties."""
    key, document = _base(draw)
    targets = list(document) + ["x_extra"]
    if document.get("messages"):
        targets.append("@message")
    target = draw(st.sampled_from(targets))
    replacement = draw(_JSON_VALUES)
    if target == "@message":
        message = draw(st.sampled_from(document["messages"]))
        message[draw(st.sampled_from(["role", "content", "extra"]))] = replacement
    else:
        document[target] = replacement
    key = draw(st.one_of(st.just(key), st.none(), st.binary(max_size=8)))
    return key, _dumps(draw, document)
