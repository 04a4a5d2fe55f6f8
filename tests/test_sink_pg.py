"""The PostgreSQL + pgvector sink against the REAL bundled PostgreSQL and the real broker
(issue #19): kill -9 of a real `evostream sink` in the middle of a transaction, restart, and the
table equals an independent read of the topic; a replay from offset 0 changes nothing;
deletes, generations, tenants (also under row-level security), search through the index."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest

from stream.clients.producer import produce_records
from stream.index.base import SearchQuery
from stream.index.pgvector import PgVectorIndex
from stream.index.sink import Sink
from tests.support.pg import PgTarget
from tests.support.sink import (
    T0,
    SinkProc,
    differences,
    embedding,
    expected_rows,
    synthetic_traffic,
    table_of,
    tombstone,
    wait_for,
)
from tests.support.workers import read_topic_sync

PARTITIONS = 4


def produce(bootstrap: str, topic: str, recs) -> None:
    """Records with headers (null tombstones carry the tenant in one) through aiokafka."""
    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await p.start()
        try:
            futs = [await p.send(topic, v, key=k, headers=h or None) for k, v, h in recs]
            for f in futs:
                await f
        finally:
            await p.stop()

    asyncio.run(go())


def sink_env(bootstrap: str, topic: str, target: PgTarget, **extra: str) -> dict[str, str]:
    return {"EVOSTREAM_KAFKA_BOOTSTRAP": bootstrap, "EVOSTREAM_EMBEDDINGS_TOPIC": topic,
            "EVOSTREAM_SINK_TEXTS": "false", **target.env(), **extra}


def catch_up(index, bootstrap: str, topic: str, *, name: str = "s", turns: str | None = None):
    async def go():
        async with Sink(index, bootstrap, topic, turns, name=name, batch_max=200) as s:
            return await s.catch_up(idle_ms=800)

    return asyncio.run(go())


def in_transaction_with_writes(mon: psycopg.Connection) -> bool:
    """The sink's backend is inside a transaction that has written (an xid is assigned) and
    not committed: the moment a SIGKILL is "mid-batch"."""
    row = mon.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'evostream-sink' "
                      "AND backend_xid IS NOT NULL AND (query ILIKE 'INSERT INTO%%' OR query ILIKE 'DELETE FROM%%')"
                      ).fetchone()
    return bool(row[0])


def test_kill9_mid_batch_then_restart_table_equals_topic(kafka_bootstrap, topic_factory, pg_target: PgTarget,
                                                         tmp_path: Path) -> None:
    topic = topic_factory(PARTITIONS)
    produce(kafka_bootstrap, topic, synthetic_traffic(50, 30, seed=3, dim=128))
    msgs = read_topic_sync(kafka_bootstrap, topic)
    ends = {}
    for m in msgs:
        ends[m.partition] = m.offset + 1
    env = sink_env(kafka_bootstrap, topic, pg_target, EVOSTREAM_SINK_BATCH_MAX="200")
    committed: list[int] = []

    mon = psycopg.connect(pg_target.dsn, autocommit=True)   # one connection: the polls are many

    def progress() -> int:
        """Records committed so far (the offsets the sink stored with its rows)."""
        try:
            row = mon.execute(f'SELECT coalesce(sum(next_offset), 0) FROM "{pg_target.schema}".evostream_offsets '
                              "WHERE sink = 'evostream-sink' AND topic = %s", (topic,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
        return int(row[0])

    for _ in range(3):
        before = progress()
        proc = SinkProc(env, tmp_path / "sink.log").start()
        try:
            # Let it commit at least one batch of its own, then poll the server for its next
            # open, writing transaction and kill it right there.
            wait_for(lambda: progress() > before or not proc.alive(), 60, "a batch committed", interval=0.02)
            wait_for(lambda: in_transaction_with_writes(mon) or not proc.alive(), 60,
                     "the sink inside a writing transaction", interval=0.002)
            assert proc.alive(), proc.tail()
        finally:
            proc.kill()
        committed.append(progress())
    mon.close()
    done = committed[-1]
    assert 0 < committed[0] < committed[1] < committed[2] < len(msgs), (committed, len(msgs))
    proc = SinkProc(env, tmp_path / "sink.log").start()
    try:
        with PgVectorIndex(pg_target.dsn, schema=pg_target.schema, create=False) as idx:
            wait_for(lambda: idx.offsets("evostream-sink") == {(topic, p): n for p, n in ends.items()}, 120,
                     "the restarted sink at the end of every partition")
    finally:
        rc = proc.stop()
    assert rc == 0, proc.tail()
    # the restarted sink read only what was not committed (it sought to the stored offsets)
    last = re.findall(r"(\d+) records in \d+ transactions", proc.tail(5))
    assert last and int(last[-1]) == len(msgs) - done, proc.tail()
    with PgVectorIndex(pg_target.dsn, schema=pg_target.schema, create=False) as idx:
        got = table_of(idx.rows())
        # late copies of an older generation (the emitter's resent suffixes) are the only refusals
        assert {r[3] for r in idx.rejects("evostream-sink")} <= {"stale_generation"}
    want = expected_rows(msgs)
    assert len(want) > 500
    assert differences(got, want) == []


def test_replay_from_offset_zero_changes_nothing(kafka_bootstrap, topic_factory, pg_target: PgTarget) -> None:
    topic = topic_factory(PARTITIONS)
    produce(kafka_bootstrap, topic, synthetic_traffic(12, 15, seed=5))
    with PgVectorIndex(pg_target.dsn, schema=pg_target.schema) as idx:
        catch_up(idx, kafka_bootstrap, topic, name="first")
        before = [(r, r.vector.tobytes()) for r in idx.rows()]
        # a second sink name has no offsets: it reads the topic from offset 0 into the same tables
        totals = catch_up(idx, kafka_bootstrap, topic, name="replay")
        after = [(r, r.vector.tobytes()) for r in idx.rows()]
    assert totals.stats.records == len(read_topic_sync(kafka_bootstrap, topic))
    assert before and after == before


def test_tombstones_in_both_forms_delete_and_generations_never_mix(kafka_bootstrap, topic_factory,
                                                                    pg_target: PgTarget) -> None:
    topic = topic_factory(1)
    recs = [(b"a", embedding("a", s, memory="new" if s == 0 else "continued").model_dump_json().encode(), [])
            for s in range(3)]
    recs += [(b"b", embedding("b", s, tenant="t2", memory="new" if s == 0 else "continued")
              .model_dump_json().encode(), []) for s in range(3)]
    recs += [(b"c", embedding("c", s).model_dump_json().encode(), []) for s in range(4)]
    produce(kafka_bootstrap, topic, recs)
    with PgVectorIndex(pg_target.dsn, schema=pg_target.schema) as idx:
        catch_up(idx, kafka_bootstrap, topic)
        assert len(idx.rows()) == 10
        produce(kafka_bootstrap, topic, [
            tombstone("a", None, 2),                              # the event
            tombstone("b", "t2", 2, null=True),                   # a Kafka tombstone with the tenant header
            (b"c", embedding("c", 4, gen=2, memory="reset_after_expiry").model_dump_json().encode(), []),
            (b"c", embedding("c", 5, gen=2).model_dump_json().encode(), []),
            (b"c", embedding("c", 3, gen=1).model_dump_json().encode(), []),   # a late copy of the old life
        ])
        catch_up(idx, kafka_bootstrap, topic)
        keys = sorted(r.key for r in idx.rows())
        assert keys == [("", "c", 2, 4), ("", "c", 2, 5)]
        assert [(r[3]) for r in idx.rejects("s")] == ["stale_generation"]


def test_two_tenants_never_see_each_other_rows_also_under_row_level_security(kafka_bootstrap, topic_factory,
                                                                              pg_target: PgTarget) -> None:
    topic = topic_factory(2)
    same = np.ones(8, np.float32)
    recs = []
    for tenant in ("acme", "globex"):
        for s in range(4):
            ev = embedding("shared-id", s, tenant=tenant, seed=s, memory="new" if s == 0 else "continued")
            recs.append((b"shared-id", ev.model_dump_json().encode(), []))
    produce(kafka_bootstrap, topic, recs)
    role = f"reader_{pg_target.schema[-8:]}"
    with PgVectorIndex(pg_target.dsn, schema=pg_target.schema, rls=True) as idx:
        catch_up(idx, kafka_bootstrap, topic)
        for tenant in ("acme", "globex"):
            hits = idx.search(SearchQuery(vector=same, checkpoint="ck", tenant=tenant, k=10))
            assert len(hits) == 4 and {h.seq for h in hits} == {0, 1, 2, 3}
            assert {r.tenant for r in idx.rows(tenant)} == {tenant}
        assert idx.search(SearchQuery(vector=same, checkpoint="ck", tenant="initech", k=10)) == []
        assert idx.search(SearchQuery(vector=same, checkpoint="ck", k=10)) == []   # the default tenant
    # A role the policy applies to: without naming a tenant it sees nothing, with one only that
    # tenant's rows, even for a query without any tenant condition.
    with psycopg.connect(pg_target.dsn, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f'GRANT USAGE ON SCHEMA "{pg_target.schema}" TO {role}')
        c.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{pg_target.schema}" TO {role}')
    try:
        with psycopg.connect(pg_target.dsn, user=role) as c:
            t = f'"{pg_target.schema}".evostream_turns'
            assert c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] == 0
            c.execute("SELECT set_config('evostream.tenant', 'acme', true)")
            assert {r[0] for r in c.execute(f"SELECT DISTINCT tenant FROM {t}")} == {"acme"}
    finally:
        with psycopg.connect(pg_target.dsn, autocommit=True) as c:
            c.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{pg_target.schema}" FROM {role}')
            c.execute(f'REVOKE ALL ON SCHEMA "{pg_target.schema}" FROM {role}')
            c.execute(f"DROP ROLE {role}")


def test_search_ranks_by_cosine_scoped_filtered_and_with_texts(kafka_bootstrap, topic_factory,
                                                               pg_target: PgTarget) -> None:
    """Exact (one conversation) and HNSW (the tenant) answers agree on a small table; the time
    filter, the checkpoint filter and the texts from the turns topic apply."""
    emb, turns = topic_factory(2), topic_factory(2)
    rng = np.random.default_rng(0)
    recs = []
    for c in range(5):
        for s in range(6):
            ev = embedding(f"c{c}", s, seed=int(rng.integers(1 << 30)), memory="new" if s == 0 else "continued",
                           dim=16, checkpoint="ck" if c < 4 else "other")
            recs.append((f"c{c}".encode(), ev.model_dump_json().encode(), []))
    produce(kafka_bootstrap, emb, recs)
    turn = ('{"type":"turn","conversation_id":"c1","seq":2,"timestamp":"2026-12-01T12:00:00Z",'
            '"messages":[{"role":"user","content":"where is my refund?"}]}')
    asyncio.run(produce_records([(b"c1", turn.encode())], bootstrap=kafka_bootstrap, topic=turns, progress=False))
    q = rng.standard_normal(16).astype(np.float32)
    with PgVectorIndex(pg_target.dsn, schema=pg_target.schema) as idx:
        catch_up(idx, kafka_bootstrap, emb, turns=turns)
        rows = [r for r in idx.rows() if r.checkpoint == "ck"]
        def cos(v):
            return float(v @ q / np.linalg.norm(v) / np.linalg.norm(q))
        want = sorted(rows, key=lambda r: (-cos(r.vector), r.conversation_id, r.seq))
        exact = idx.search(SearchQuery(vector=q, checkpoint="ck", k=7, exact=True))
        assert [(h.conversation_id, h.seq) for h in exact] == [(r.conversation_id, r.seq) for r in want[:7]]
        assert [round(h.score, 5) for h in exact] == [round(cos(r.vector), 5) for r in want[:7]]
        hnsw = idx.search(SearchQuery(vector=q, checkpoint="ck", k=7))
        assert [(h.conversation_id, h.seq) for h in hnsw] == [(h.conversation_id, h.seq) for h in exact]
        one = idx.search(SearchQuery(vector=q, checkpoint="ck", conversation_id="c1", k=10))
        assert [h.seq for h in one] == [r.seq for r in want if r.conversation_id == "c1"]
        assert next(h for h in one if h.seq == 2).text == "user: where is my refund?"
        late = idx.search(SearchQuery(vector=q, checkpoint="ck", since=T0 + timedelta(seconds=2.5), k=100))
        assert {h.seq for h in late} == {3, 4, 5}
        assert {h.conversation_id for h in idx.search(SearchQuery(vector=q, checkpoint="other", k=100))} == {"c4"}
        with pytest.raises(ValueError, match="dim 3"):
            idx.search(SearchQuery(vector=np.ones(3, np.float32), checkpoint="ck"))


def test_sink_waits_as_standby_while_another_of_the_same_name_runs(kafka_bootstrap, topic_factory,
                                                                    pg_target: PgTarget, tmp_path: Path) -> None:
    topic = topic_factory(1)
    produce(kafka_bootstrap, topic, [(b"a", embedding("a", 0, memory="new").model_dump_json().encode(), [])])
    env = sink_env(kafka_bootstrap, topic, pg_target)
    first = SinkProc(env, tmp_path / "first.log").start()
    try:
        with PgVectorIndex(pg_target.dsn, schema=pg_target.schema) as idx:
            wait_for(lambda: idx.count() == 1, 60, "the first sink's row")
        second = SinkProc(env, tmp_path / "second.log", args=("--no-wait",)).start()
        assert second.wait(60) == 1
        assert "another sink named 'evostream-sink'" in second.tail()
    finally:
        first.stop()
    time.sleep(0)


def test_several_processes_start_their_own_bundled_servers_at_once(tmp_path: Path) -> None:
    """What pytest-xdist workers do (tests/support/pg.py): each process starts its own server in
    its own data directory at the same moment; each gets a working, separate PostgreSQL."""
    import subprocess
    import sys

    script = ("import sys; from devtools.postgres import EmbeddedPostgres\n"
              "pg = EmbeddedPostgres(sys.argv[1]).start()\n"
              "with pg.connect() as c:\n"
              "    c.execute('CREATE TABLE mine (who text)'); c.execute('INSERT INTO mine VALUES (%s)', (sys.argv[1],))\n"
              "    print(c.execute('SELECT who FROM mine').fetchall()[0][0], pg.pid)\n"
              "pg.stop()\n")
    from tests.support.workers import REPO

    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"pg{i}")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    seen = [o[0].split() for o in outs]
    assert [s[0] for s in seen] == [str(tmp_path / f"pg{i}") for i in range(3)]
    assert len({s[1] for s in seen}) == 3   # three servers
