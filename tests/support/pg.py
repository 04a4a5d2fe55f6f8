"""The bundled PostgreSQL + pgvector for tests (issue #19): one server per test process
(pytest-xdist workers each start their own, in their own temp dir: about a second), one
schema per test (`pg_index`), so tests never see each other's tables.

Point the suite at an external PostgreSQL (with pgvector) instead with
``EVOSTREAM_TEST_PG_DSN``; schemas keep tests apart there too.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

EXTERNAL_PG = "EVOSTREAM_TEST_PG_DSN"


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the session's PostgreSQL (started lazily: tests that need none never pay)."""
    external = os.environ.get(EXTERNAL_PG)
    if external:
        yield external
        return
    from devtools.postgres import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data").start()
    try:
        yield pg.dsn()
    finally:
        pg.stop()


@dataclass(frozen=True)
class PgTarget:
    dsn: str
    schema: str

    def env(self) -> dict[str, str]:
        """EVOSTREAM_* variables that point a subprocess at this schema."""
        return {"EVOSTREAM_SINK_DSN": self.dsn, "EVOSTREAM_SINK_SCHEMA": self.schema}


@pytest.fixture
def pg_target(pg_dsn: str, request: pytest.FixtureRequest) -> Iterator[PgTarget]:
    """A fresh schema for this test (dropped afterwards)."""
    import psycopg

    base = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:30]
    schema = f"t_{base}_{uuid.uuid4().hex[:8]}"
    yield PgTarget(pg_dsn, schema)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
