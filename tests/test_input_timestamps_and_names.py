"""Issue #17 item 6: inbound timestamps in epoch *seconds*, and unknown field names in the log.

Before: `1733140800` (2024-12-02 in seconds) was read as milliseconds, January 1970, without a
word; an unknown field *name* was logged verbatim, so a secret a producer used as a key (a
token pasted into the wrong place) landed in the worker log.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.events import ConversationDelete, TurnEvent
from stream.processing.input_shapes import InputShapes

SECONDS = 1_733_140_800  # 2024-12-02T12:00:00Z
MILLIS = SECONDS * 1000


def _turn(ts: object, **extra: object) -> TurnEvent:
    return TurnEvent.model_validate_json(json.dumps({
        "type": "turn", "conversation_id": "c1", "seq": 0, "timestamp": ts,
        "messages": [{"role": "user", "content": "hi"}], **extra}))


def test_epoch_seconds_are_read_as_seconds() -> None:
    assert _turn(SECONDS).timestamp == datetime(2024, 12, 2, 12, 0, tzinfo=UTC)


def test_epoch_milliseconds_still_read_as_milliseconds() -> None:
    assert _turn(MILLIS).timestamp == datetime(2024, 12, 2, 12, 0, tzinfo=UTC)
    assert _turn(MILLIS + 7).timestamp.microsecond == 7000


def test_the_unit_boundary_is_where_the_readme_says() -> None:
    """Below 10**11 a number is seconds (up to year 5138), from 10**11 on it is milliseconds
    (from 1973-03-03): no instant of this century is ambiguous."""
    assert _turn(10**11 - 1).timestamp.year == 5138
    assert _turn(10**11).timestamp == datetime(1973, 3, 3, 9, 46, 40, tzinfo=UTC)
    # deletes follow the same rule
    d = ConversationDelete.model_validate_json(json.dumps(
        {"type": "delete", "conversation_id": "c1", "timestamp": SECONDS}))
    assert d.timestamp.year == 2024


@pytest.mark.parametrize("bad", [-1, 1.5e9, "1733140800", True])
def test_other_numbers_stay_errors(bad: object) -> None:
    with pytest.raises(ValidationError):
        _turn(bad)


SECRET = "sk-live-4f9a7c2e1b8d6f3a0e5c"


def test_unknown_field_names_are_never_logged_verbatim(caplog: pytest.LogCaptureFixture) -> None:
    shapes = InputShapes()
    ev = _turn(MILLIS, **{SECRET: "x", "metdata": {"a": 1}})
    with caplog.at_level(logging.WARNING, logger="stream.processing.input_shapes"):
        shapes.observe(ev)
    text = caplog.text
    assert caplog.records, "the unknown fields were not reported at all"
    assert SECRET not in text
    assert SECRET[:8] not in text, "a prefix long enough to recognise the secret was logged"
    # the operator can still match a suspected name: its hash is in the line
    assert InputShapes.name_digest(SECRET) in text
    assert InputShapes.name_digest("metdata") in text
