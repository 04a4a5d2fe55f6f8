"""The published wire contract (schemas/json/*.schema.json) matches the pydantic models, and
events of the previous and of a newer producer validate against it (issue #13).

The end-to-end half of the compatibility check (both kinds of event processed by a real
worker) is in tests/test_interop_formats.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest

from schemas.events import (
    ConversationDeleted,
    DeadLetterEvent,
    DeadLetterReason,
    EmbeddingEvent,
    SourceRef,
    StageTimings,
    TurnEvent,
)
from schemas.vectors import encode_vector
from stream.processing.decode import decode_inbound

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas" / "json"
T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)

# Exactly what a version-1 producer (evostream's own, before issue #13) published.
V1_TURN = (b'{"type":"turn","schema_version":1,"conversation_id":"conv-42","seq":7,'
           b'"messages":[{"role":"user","content":"What is the capital of France?"},'
           b'{"role":"assistant","content":"Paris."}],"timestamp":"2024-05-01T12:30:15.250000Z",'
           b'"tenant":"acme","metadata":{"channel":"web"}}')
V1_DELETE = b'{"type":"delete","schema_version":1,"conversation_id":"conv-42","seq":7,"timestamp":"2024-05-01T12:31:00Z"}'
# A newer producer: fields this version does not know, at both levels, and the chat-API shapes.
NEWER_TURN = json.dumps({
    "type": "turn", "schema_version": 1, "conversation_id": "conv-42", "seq": 8,
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "And of Italy?", "name": "bob", "lang": "en"},
                 {"role": "assistant", "content": [{"type": "text", "text": "Rome."}]}],
    "timestamp": 1714566675250, "tenant": "acme", "metadata": {"channel": "web"},
    "channel_id": "c-9", "trace": {"id": "abc", "sampled": True}, "producer_version": "2.3.0",
}).encode()


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text(encoding="utf-8"))


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = _schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_checked_in_schemas_match_the_models() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_wire_schemas", REPO / "scripts" / "gen_wire_schemas.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen._documents()
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(expected)
    for name, doc in expected.items():
        assert (SCHEMAS / name).read_text(encoding="utf-8") == gen.render(doc), \
            f"{name} is stale: run .venv/bin/python scripts/gen_wire_schemas.py"


@pytest.mark.parametrize("value", [V1_TURN, V1_DELETE, NEWER_TURN], ids=["v1-turn", "v1-delete", "newer-turn"])
def test_previous_and_newer_producers_validate_and_decode(value: bytes) -> None:
    _validator("turns-topic.inbound.schema.json").validate(json.loads(value))
    event = decode_inbound(b"conv-42", value, max_bytes=1 << 20, max_depth=32)
    assert event.type in ("turn", "delete"), event


def test_strict_schema_is_the_v1_contract() -> None:
    strict = _validator("turns-topic.inbound-v1-strict.schema.json")
    strict.validate(json.loads(V1_TURN))
    strict.validate(json.loads(V1_DELETE))
    assert not strict.is_valid(json.loads(NEWER_TURN))
    assert decode_inbound(b"conv-42", NEWER_TURN, max_bytes=1 << 20, max_depth=32, strict=True).reason_code \
        in (DeadLetterReason.SCHEMA_VIOLATION, DeadLetterReason.UNKNOWN_ROLE)


def test_newer_turn_is_read_as_documented() -> None:
    event = decode_inbound(b"conv-42", NEWER_TURN, max_bytes=1 << 20, max_depth=32)
    assert isinstance(event, TurnEvent)
    assert [(m.role, m.content) for m in event.to_turn_input().messages] == [("user", "And of Italy?"),
                                                                           ("assistant", "Rome.")]
    assert set(event.unknown_fields) == {"channel_id", "trace", "producer_version", "messages[1].lang"}


def test_outbound_events_validate() -> None:
    out = _validator("embeddings-topic.outbound.schema.json")
    vec = np.linspace(-1, 1, 8, dtype=np.float32)
    emb = EmbeddingEvent(conversation_id="c", seq=0, vector=encode_vector(vec), dim=8, model="m", checkpoint="fp",
                         memory_len=16, source=SourceRef(topic="t", partition=0, offset=3),
                         timings=StageTimings(queue_ms=1, step_ms=2, checkpoint_ms=0), produced_at=T0)
    out.validate(json.loads(emb.model_dump_json()))
    out.validate(json.loads(ConversationDeleted(conversation_id="c", deleted_through_seq=3, at=T0).model_dump_json()))
    assert not out.is_valid({**json.loads(emb.model_dump_json()), "type": "turn"})
    dl = DeadLetterEvent(reason_code=DeadLetterReason.INVALID_JSON, reason="x", original_key_b64=None,
                         original_value_b64="e30=", topic="t", partition=0, offset=1, timestamp_ms=None,
                         failed_at=T0, worker="w")
    _validator("dead-letter-topic.schema.json").validate(json.loads(dl.model_dump_json()))
