"""The PostgreSQL + pgvector backend of the index (issue #19).

Tables (schema `sink_schema`, names `<sink_table_prefix>_...`):

* `_turns`: one row per turn embedding, primary key (tenant, conversation_id, generation,
  seq); `embedding vector(E)` with an HNSW index (cosine); a btree on (tenant, conversation_id)
  serves the per-conversation searches and the deletes. E is fixed by the first row.
  Dimensions above 2000 (pgvector's HNSW limit for `vector`) are indexed as `halfvec(E)`
  through an expression index; the stored vectors stay float32.
* `_texts`: (tenant, conversation_id, seq) -> the turn's text, from the turns topic.
* `_offsets`: (sink, topic, partition) -> next offset: written in the SAME transaction as the
  rows of the batch that reached it, so a crash anywhere leaves neither a gap nor a double.
* `_rejects`: records the sink could not apply, with topic/partition/offset and a reason.

Tenancy: every statement names the tenant. With `sink_rls` the turns and texts tables get
row-level security: a role other than the owner sees only rows of the tenant its transaction
sets (`evostream.tenant`), which every search does; the sink (the owner) bypasses it.

Vectors travel in pgvector's binary format (a small psycopg dumper/loader below), so a
float32 value is stored and read back bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import zlib
from typing import Any, Iterator

import numpy as np

from stream.index.base import IndexError_, IndexHit, SearchQuery, VectorIndex, check_query
from stream.index.ops import ConvKey, Plan, TurnRow, tenant_key

log = logging.getLogger(__name__)

HNSW_MAX_VECTOR_DIM = 2000
TENANT_SETTING = "evostream.tenant"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        raise IndexError_("the PostgreSQL index needs psycopg (pip install 'psycopg[binary]')") from exc
    return psycopg


def _register_vector(conn: Any) -> int:
    """Binary dumper (numpy float32 -> vector) and loader (vector -> numpy) on `conn`."""
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format

    row = conn.execute("SELECT oid FROM pg_type WHERE typname = 'vector'").fetchone()
    if row is None:
        raise IndexError_("the pgvector extension is not installed in this database (CREATE EXTENSION vector)")
    oid = int(row[0])

    class VectorDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            a = np.asarray(obj, dtype=">f4").reshape(-1)
            return struct.pack(">HH", a.shape[0], 0) + a.tobytes()

    VectorDumper.oid = oid

    class VectorLoader(Loader):
        format = Format.BINARY

        def load(self, data: Any) -> np.ndarray:
            dim = struct.unpack_from(">H", data, 0)[0]
            return np.frombuffer(bytes(data), dtype=">f4", count=dim, offset=4).astype(np.float32)

    conn.adapters.register_dumper(np.ndarray, VectorDumper)
    conn.adapters.register_loader(oid, VectorLoader)
    return oid


def connect(dsn: str, *, application_name: str = "evostream", autocommit: bool = False) -> Any:
    psycopg = _psycopg()
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, application_name=application_name, connect_timeout=10)
    except psycopg.Error as exc:
        raise IndexError_(f"cannot connect to PostgreSQL: {str(exc).strip().splitlines()[0]}") from None
    return conn


class PgVectorIndex(VectorIndex):
    """See the module doc. Not thread-safe: one owner per instance."""

    kind = "postgres"

    def __init__(self, dsn: str, *, schema: str = "public", prefix: str = "evostream", rls: bool = False,
                 ef_search: int = 100, create: bool = True, application_name: str = "evostream-sink"):
        self.schema, self.prefix, self.rls, self.ef_search = schema, prefix, rls, ef_search
        self.conn = connect(dsn, application_name=application_name)
        self._where = self._describe()
        self._dim: int | None = None
        try:
            with self.conn.transaction():
                if create:
                    self._create_base()
                self._vector_schema = self._ensure_extension(create)
                self.conn.execute(f"SET search_path TO {self._q(schema)}, {self._q(self._vector_schema)}")
            _register_vector(self.conn)
            self._dim = self._table_dim()
        except BaseException:
            self.conn.close()
            raise

    # -- naming ------------------------------------------------------------------------------
    @staticmethod
    def _q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def t(self, what: str) -> str:
        """Qualified table name of `<prefix>_<what>`."""
        return f"{self._q(self.schema)}.{self._q(f'{self.prefix}_{what}')}"

    def _describe(self) -> str:
        info = self.conn.info
        host = info.host or "local socket"
        return f"postgresql://{info.user}@{host}:{info.port}/{info.dbname} ({self.schema}.{self.prefix}_turns)"

    @property
    def where(self) -> str:
        return self._where

    # -- schema ------------------------------------------------------------------------------
    def _ensure_extension(self, create: bool) -> str:
        row = self.conn.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                                "WHERE e.extname = 'vector'").fetchone()
        if row is None and create:
            psycopg = _psycopg()
            try:
                with self.conn.transaction():
                    self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise IndexError_(f"pgvector is not installed in {self.where} and this role cannot install it "
                                  f"({str(exc).strip().splitlines()[0]}); ask the database owner to run "
                                  "CREATE EXTENSION vector") from None
            row = self.conn.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
                                    "ON n.oid = e.extnamespace WHERE e.extname = 'vector'").fetchone()
        if row is None:
            raise IndexError_(f"pgvector is not installed in {self.where} (CREATE EXTENSION vector)")
        return str(row[0])

    def _create_base(self) -> None:
        x = self.conn.execute
        x(f"CREATE SCHEMA IF NOT EXISTS {self._q(self.schema)}")
        x(f"""CREATE TABLE IF NOT EXISTS {self.t('texts')} (
                tenant text NOT NULL, conversation_id text NOT NULL, seq bigint NOT NULL, text text NOT NULL,
                PRIMARY KEY (tenant, conversation_id, seq))""")
        x(f"""CREATE TABLE IF NOT EXISTS {self.t('offsets')} (
                sink text NOT NULL, topic text NOT NULL, partition integer NOT NULL, next_offset bigint NOT NULL,
                PRIMARY KEY (sink, topic, partition))""")
        x(f"""CREATE TABLE IF NOT EXISTS {self.t('rejects')} (
                sink text NOT NULL, topic text NOT NULL, partition integer NOT NULL, "offset" bigint NOT NULL,
                reason text NOT NULL, detail text NOT NULL, record_key bytea, record_value bytea,
                rejected_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (sink, topic, partition, "offset"))""")
        if self.rls:
            self._enable_rls("texts")

    def _enable_rls(self, what: str) -> None:
        self.conn.execute(f"ALTER TABLE {self.t(what)} ENABLE ROW LEVEL SECURITY")
        policy = f"{self.prefix}_{what}_tenant"
        exists = self.conn.execute("SELECT 1 FROM pg_policies WHERE schemaname = %s AND tablename = %s "
                                   "AND policyname = %s", (self.schema, f"{self.prefix}_{what}", policy)).fetchone()
        if not exists:
            self.conn.execute(f"CREATE POLICY {self._q(policy)} ON {self.t(what)} "
                              f"USING (tenant = current_setting('{TENANT_SETTING}', true))")

    def _table_dim(self) -> int | None:
        from psycopg.pq import TransactionStatus

        idle = self.conn.info.transaction_status == TransactionStatus.IDLE
        row = self.conn.execute(
            "SELECT a.atttypmod FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
            "AND a.attname = 'embedding'", (self.schema, f"{self.prefix}_turns")).fetchone()
        if idle:
            self.conn.rollback()
        return int(row[0]) if row and row[0] > 0 else None

    def _create_turns(self, dim: int) -> None:
        x = self.conn.execute
        x(f"""CREATE TABLE IF NOT EXISTS {self.t('turns')} (
                tenant text NOT NULL, conversation_id text NOT NULL, generation integer NOT NULL, seq bigint NOT NULL,
                document_id uuid NOT NULL, memory_origin text NOT NULL, checkpoint text NOT NULL, model text NOT NULL,
                memory_len integer NOT NULL, produced_at timestamptz NOT NULL, turn_at timestamptz NOT NULL,
                source_partition integer NOT NULL, source_offset bigint NOT NULL, embedding vector({dim}) NOT NULL,
                PRIMARY KEY (tenant, conversation_id, generation, seq))""")
        ops = ("embedding vector_cosine_ops" if dim <= HNSW_MAX_VECTOR_DIM
               else f"(embedding::halfvec({dim})) halfvec_cosine_ops")
        x(f"CREATE INDEX IF NOT EXISTS {self._q(self.prefix + '_turns_hnsw')} ON {self.t('turns')} USING hnsw ({ops})")
        x(f"CREATE INDEX IF NOT EXISTS {self._q(self.prefix + '_turns_time')} ON {self.t('turns')} (tenant, turn_at)")
        if self.rls:
            self._enable_rls("turns")
        self._dim = dim

    def _distance(self, dim: int) -> str:
        """The ORDER BY expression the HNSW index serves (see `_create_turns`)."""
        return "embedding <=> %(q)s" if dim <= HNSW_MAX_VECTOR_DIM else f"embedding::halfvec({dim}) <=> %(q)s::halfvec({dim})"

    @property
    def dim(self) -> int | None:
        if self._dim is None:  # another process (the sink) may have created the table since
            self._dim = self._table_dim()
        return self._dim

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def stored_generations(self, convs: set[ConvKey]) -> dict[ConvKey, set[int]]:
        if not convs or self.dim is None:
            return {}
        tenants, cids = zip(*sorted(convs))
        rows = self.conn.execute(
            f"SELECT t.tenant, t.conversation_id, array_agg(DISTINCT t.generation) FROM {self.t('turns')} t "
            "JOIN unnest(%s::text[], %s::text[]) AS k(tenant, conversation_id) "
            "ON t.tenant = k.tenant AND t.conversation_id = k.conversation_id GROUP BY 1, 2",
            (list(tenants), list(cids))).fetchall()
        return {(r[0], r[1]): set(r[2]) for r in rows}

    def execute(self, sink: str, plan: Plan) -> None:
        cur = self.conn.cursor()
        if plan.upserts and self._dim is None:
            self._create_turns(int(next(iter(plan.upserts.values())).vector.shape[0]))
        if plan.row_deletes and self.dim is not None:
            cur.executemany(f"DELETE FROM {self.t('turns')} WHERE tenant = %s AND conversation_id = %s "
                            "AND generation = ANY(%s)",
                            [(c[0], c[1], sorted(g)) for c, g in plan.row_deletes.items()])
        if plan.text_deletes:
            cur.executemany(f"DELETE FROM {self.t('texts')} WHERE tenant = %s AND conversation_id = %s",
                            sorted(plan.text_deletes))
        if plan.upserts:
            cur.executemany(
                f"""INSERT INTO {self.t('turns')} (tenant, conversation_id, generation, seq, document_id, memory_origin,
                    checkpoint, model, memory_len, produced_at, turn_at, source_partition, source_offset, embedding)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %b)
                    ON CONFLICT (tenant, conversation_id, generation, seq) DO UPDATE SET
                    document_id = EXCLUDED.document_id, memory_origin = EXCLUDED.memory_origin,
                    checkpoint = EXCLUDED.checkpoint, model = EXCLUDED.model, memory_len = EXCLUDED.memory_len,
                    produced_at = EXCLUDED.produced_at, turn_at = EXCLUDED.turn_at,
                    source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset,
                    embedding = EXCLUDED.embedding""",
                [(r.tenant, r.conversation_id, r.generation, r.seq, r.document_id, r.memory_origin, r.checkpoint,
                  r.model, r.memory_len, r.produced_at, r.turn_at, r.source_partition, r.source_offset, r.vector)
                 for r in plan.upserts.values()])
        if plan.texts:
            cur.executemany(f"INSERT INTO {self.t('texts')} (tenant, conversation_id, seq, text) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (tenant, conversation_id, seq) DO UPDATE SET text = EXCLUDED.text",
                            [(k[0], k[1], k[2], v) for k, v in plan.texts.items()])
        if plan.rejects:
            cur.executemany(f"""INSERT INTO {self.t('rejects')} (sink, topic, partition, "offset", reason, detail,
                                record_key, record_value) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                                ON CONFLICT DO NOTHING""",
                            [(sink, r.topic, r.partition, r.offset, r.reason, r.detail, r.key, r.value)
                             for r in plan.rejects])
        if plan.offsets:
            cur.executemany(f"INSERT INTO {self.t('offsets')} (sink, topic, partition, next_offset) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (sink, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
                            [(sink, t, p, n) for (t, p), n in sorted(plan.offsets.items())])

    def offsets(self, sink: str) -> dict[tuple[str, int], int]:
        rows = self.conn.execute(f"SELECT topic, partition, next_offset FROM {self.t('offsets')} WHERE sink = %s",
                                 (sink,)).fetchall()
        self.conn.rollback()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def rejects(self, sink: str) -> list[tuple[str, int, int, str]]:
        rows = self.conn.execute(f'SELECT topic, partition, "offset", reason FROM {self.t("rejects")} WHERE sink = %s '
                                 'ORDER BY 1, 2, 3', (sink,)).fetchall()
        self.conn.rollback()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def acquire_writer(self, sink: str) -> bool:
        key = zlib.crc32(f"{self.schema}.{self.prefix}:{sink}".encode()) - 2**31
        got = bool(self.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
        self.conn.commit()
        return got

    def forget(self, sink: str) -> None:
        with self.conn.transaction():
            self.conn.execute(f"DELETE FROM {self.t('offsets')} WHERE sink = %s", (sink,))
            self.conn.execute(f"DELETE FROM {self.t('rejects')} WHERE sink = %s", (sink,))
            self.conn.execute(f"DELETE FROM {self.t('texts')}")
            if self.dim is not None:
                self.conn.execute(f"DELETE FROM {self.t('turns')}")

    # -- reading -----------------------------------------------------------------------------
    def count(self) -> int:
        if self.dim is None:
            return 0
        n = int(self.conn.execute(f"SELECT count(*) FROM {self.t('turns')}").fetchone()[0])
        self.conn.rollback()
        return n

    def text(self, tenant: str | None, conversation_id: str, seq: int) -> str | None:
        with self.conn.transaction():
            self._set_tenant(tenant)
            row = self.conn.execute(f"SELECT text FROM {self.t('texts')} WHERE tenant = %s AND conversation_id = %s "
                                    "AND seq = %s", (tenant_key(tenant), conversation_id, seq)).fetchone()
        return row[0] if row else None

    def rows(self, tenant: str | None = None) -> list[TurnRow]:
        if self.dim is None:
            return []
        where, args = ("WHERE tenant = %s", (tenant_key(tenant),)) if tenant is not None else ("", ())
        with self.conn.transaction():
            if tenant is not None:
                self._set_tenant(tenant)
            cur = self.conn.cursor(binary=True)
            cur.execute(f"""SELECT tenant, conversation_id, generation, seq, document_id::text, memory_origin,
                            checkpoint, model, memory_len, embedding, produced_at, turn_at, source_partition,
                            source_offset FROM {self.t('turns')} {where} ORDER BY 1, 2, 3, 4""", args)
            return [TurnRow(*r) for r in cur.fetchall()]

    def _set_tenant(self, tenant: str | None) -> None:
        self.conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant_key(tenant)))

    def search(self, q: SearchQuery) -> list[IndexHit]:
        rows = self._run_search(q, explain=False)
        return [IndexHit(conversation_id=r[0], generation=r[1], seq=r[2], document_id=r[3],
                         score=float(np.clip(r[4], -1.0, 1.0)), turn_at=r[5], text=r[6]) for r in rows]

    def explain(self, q: SearchQuery) -> str:
        """The plan PostgreSQL chooses for `q` (the benchmark checks the HNSW index is used)."""
        return "\n".join(r[0] for r in self._run_search(q, explain=True))

    def _run_search(self, q: SearchQuery, *, explain: bool) -> list[tuple]:
        v = check_query(q, self.dim)
        if self._dim is None:
            return []
        args: dict[str, Any] = {"q": v, "tenant": tenant_key(q.tenant), "ck": q.checkpoint, "k": q.k,
                                "cid": q.conversation_id, "since": q.since, "until": q.until}
        where = ["tenant = %(tenant)s", "checkpoint = %(ck)s"]
        if q.conversation_id is not None:
            where.append("conversation_id = %(cid)s")
        if q.since is not None:
            where.append("turn_at >= %(since)s")
        if q.until is not None:
            where.append("turn_at < %(until)s")
        dist = self._distance(self._dim)
        if q.conversation_id is not None or q.exact:
            # An exact scan: one conversation is a few rows (its btree finds them); OFFSET 0 keeps
            # the planner from answering through the approximate index.
            inner = (f"SELECT *, {dist} AS d FROM (SELECT * FROM {self.t('turns')} WHERE {' AND '.join(where)} "
                     f"OFFSET 0) s ORDER BY d, conversation_id, seq LIMIT %(k)s")
        else:
            inner = (f"SELECT *, {dist} AS d FROM {self.t('turns')} WHERE {' AND '.join(where)} "
                     f"ORDER BY {dist} LIMIT %(k)s")
        sql = (f"SELECT n.conversation_id, n.generation, n.seq, n.document_id::text, 1 - n.d, n.turn_at, x.text "
               f"FROM ({inner}) n LEFT JOIN {self.t('texts')} x ON x.tenant = n.tenant "
               f"AND x.conversation_id = n.conversation_id AND x.seq = n.seq ORDER BY n.d, n.conversation_id, n.seq")
        with self.conn.transaction():
            # one round trip: the tenant (row-level security), the graph's breadth, and pgvector
            # 0.8's iterative scan (keep walking the graph until k rows pass the tenant filter)
            # An approximate search must go through the HNSW index: with the vectors TOASTed out
            # of line, the planner may cost a scan of every row as cheaper (measured at 100k
            # rows of 1024-d), so sequential scans are off for it; an exact one turns indexes off.
            approximate = q.conversation_id is None and not q.exact
            self.conn.execute("SELECT set_config(%s, %s, true), set_config('hnsw.ef_search', %s, true), "
                              "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                              "set_config('enable_indexscan', %s, true), set_config('enable_seqscan', %s, true)",
                              (TENANT_SETTING, tenant_key(q.tenant), str(int(self.ef_search)),
                               "off" if q.exact else "on", "off" if approximate else "on"))
            return self.conn.execute(("EXPLAIN " if explain else "") + sql, args).fetchall()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


__all__ = ["HNSW_MAX_VECTOR_DIM", "PgVectorIndex", "TENANT_SETTING", "connect"]
