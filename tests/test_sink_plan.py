"""The sink's batch planner (stream/index/ops.py, issue #19) against the rules applied one record
at a time: for any sequence of records split into any batches, planning each batch and running
its statements ends in the same table. Pure logic, no database (the backends are tested
against real PostgreSQL and SQLite in tests/test_sink_index.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.index.ops import DeleteConversation, Reject, TurnRow, Upsert, parse_embedding_record, plan
from stream.kafka.connect import HEADER_TENANT, HEADER_TYPE
from tests.support.sink import embedding, tombstone

T = datetime(2026, 12, 1, tzinfo=timezone.utc)


def row(conv: tuple[str, str], gen: int, seq: int, origin: str, tag: int) -> TurnRow:
    return TurnRow(conv[0], conv[1], gen, seq, f"d{tag}", origin, "ck", "m", 0, np.full(2, tag, np.float32), T, T, 0, tag)


def one_at_a_time(table: dict, op) -> None:
    """The rules of the module doc, literally."""
    if isinstance(op, DeleteConversation):
        for k in [k for k in table if k[:2] == op.conv]:
            del table[k]
    elif isinstance(op, Upsert):
        r = op.row
        mine = [k for k in table if k[:2] == r.conv]
        if op.starts_generation:
            for k in mine:
                del table[k]
        else:
            if any(k[2] > r.generation for k in mine):
                return
            for k in mine:
                if k[2] < r.generation:
                    del table[k]
        table[r.key] = r


def run_plan(table: dict, batch: list) -> None:
    stored: dict = {}
    for k in table:
        stored.setdefault(k[:2], set()).add(k[2])
    p = plan([("emb", 0, i, op) for i, op in enumerate(batch)], stored)
    for c, gens in p.row_deletes.items():
        for k in [k for k in table if k[:2] == c and k[2] in gens]:
            del table[k]
    table.update(p.upserts)


CONVS = [("", "a"), ("", "b"), ("t", "a")]
op_st = st.one_of(
    st.builds(lambda c, g, s, o, tag: Upsert(row(CONVS[c], g, s, o, tag)), st.integers(0, 2), st.integers(1, 3),
              st.integers(0, 3), st.sampled_from(["continued", "continued", "new", "reset_after_delete"]),
              st.integers(0, 10**6)),
    st.builds(lambda c: DeleteConversation(CONVS[c]), st.integers(0, 2)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_st, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_planned_batches_equal_records_applied_one_at_a_time(ops, cuts) -> None:
    want: dict = {}
    for op in ops:
        one_at_a_time(want, op)
    got: dict = {}
    bounds = sorted({0, len(ops), *[c for c in cuts if c <= len(ops)]})
    for a, b in zip(bounds, bounds[1:]):
        run_plan(got, ops[a:b])
    assert {k: v.source_offset for k, v in got.items()} == {k: v.source_offset for k, v in want.items()}


def test_offsets_are_the_next_offset_of_each_partition_and_stale_turns_are_kept_as_rejects() -> None:
    new = Upsert(row(("", "a"), 2, 0, "reset_after_expiry", 1))
    old = Upsert(row(("", "a"), 1, 5, "continued", 2))
    p = plan([("emb", 3, 10, new), ("emb", 3, 11, old), ("emb", 1, 4, "not_a_turn")], {("", "a"): {1}})
    assert p.offsets == {("emb", 3): 12, ("emb", 1): 5}
    assert p.row_deletes == {("", "a"): {1}}
    assert list(p.upserts) == [("", "a", 2, 0)]
    assert [(r.offset, r.reason) for r in p.rejects] == [(11, "stale_generation")]
    assert p.stats.stale == 1 and p.stats.ignored == {"not_a_turn": 1}


def test_records_parse_to_ops_in_both_tombstone_forms_and_bad_records_to_rejects() -> None:
    ev = embedding("c1", 3, gen=2, tenant="acme")
    op = parse_embedding_record("emb", 0, 7, b"c1", ev.model_dump_json().encode())
    assert isinstance(op, Upsert) and op.row.key == ("acme", "c1", 2, 3) and op.row.document_id == ev.document_id
    key, value, headers = tombstone("c1", "acme", 3)
    assert parse_embedding_record("emb", 0, 8, key, value, headers) == DeleteConversation(("acme", "c1"))
    key, value, headers = tombstone("c1", "acme", 3, null=True)
    assert value is None and (HEADER_TYPE, b"conversation_deleted") in headers and (HEADER_TENANT, b"acme") in headers
    assert parse_embedding_record("emb", 0, 9, key, value, headers) == DeleteConversation(("acme", "c1"))
    assert parse_embedding_record("emb", 0, 9, b"c1", None, []) == DeleteConversation(("", "c1"))
    for k, v, reason in [(b"c1", b"{", "json_invalid"), (b"other", ev.model_dump_json().encode(), "key_mismatch"),
                         (None, None, "null_without_key")]:
        r = parse_embedding_record("emb", 0, 1, k, v)
        assert isinstance(r, Reject) and r.reason == reason and r.value == v, r


def test_document_id_is_the_documented_uuid5_and_differs_per_turn_and_generation() -> None:
    """README "Kafka Connect conventions": UUID v5, namespace 5f0c3a52-..., of
    tenant U+001F conversation U+001F generation U+001F seq (the default tenant is "")."""
    import uuid

    ns = uuid.UUID("5f0c3a52-6c1e-4d7a-9a43-3b8e2f1d9e17")
    ev = embedding("c1", 3, gen=2, tenant="acme")
    assert ev.document_id == str(uuid.uuid5(ns, "acme\x1fc1\x1f2\x1f3"))
    assert embedding("c1", 3).document_id == str(uuid.uuid5(ns, "\x1fc1\x1f1\x1f3"))
    ids = {embedding("c1", s, gen=g, tenant=t).document_id for s in range(3) for g in (1, 2) for t in (None, "acme")}
    assert len(ids) == 12


def test_connect_shapes_floats_exactly_and_tombstones_as_null_records() -> None:
    import json

    from schemas.events import OUTBOUND_EVENT_ADAPTER
    from schemas.vectors import decode_vector
    from stream.kafka.connect import HEADER_DOCUMENT_ID, ConnectConventions
    from stream.kafka.emitter import OutMessage

    ev = embedding("c1", 0, tenant="acme", dim=64, seed=5)
    msg = OutMessage("emb", b"c1", ev.model_dump_json().encode())
    (out,) = ConnectConventions("emb", vector_format="floats").shape(msg)
    obj = json.loads(out.value)
    assert isinstance(obj["vector"], list) and dict(out.headers)[HEADER_DOCUMENT_ID] == ev.document_id.encode()
    back = OUTBOUND_EVENT_ADAPTER.validate_json(out.value)
    assert decode_vector(back.vector).tobytes() == decode_vector(ev.vector).tobytes()   # bit for bit
    assert ConnectConventions("emb", vector_format="floats").shape(msg) == [out]       # copies stay identical
    key, value, _ = tombstone("c1", "acme", 4)
    tomb = OutMessage("emb", key, value)
    assert ConnectConventions("emb").shape(tomb) == [tomb]
    null = ConnectConventions("emb", tombstones="null").shape(tomb)
    both = ConnectConventions("emb", tombstones="both").shape(tomb)
    assert [m.value for m in null] == [None] and [m.value for m in both] == [value, None]
    assert parse_embedding_record("emb", 0, 1, null[0].key, None, null[0].headers) == DeleteConversation(("acme", "c1"))
    other = OutMessage("dlq", b"c1", value)
    assert ConnectConventions("emb", tombstones="null").shape(other) == [other]        # only the embeddings topic
