"""Fixtures for the audit tests: real stores.

- `audit_db` / `audit_store`: an `AuditStore` on SQLite (a file in tmp_path) or PostgreSQL (a fresh schema on the
  machine's server, dropped after the test with its writer role; skipped when unreachable, failed when
  TRADEGUARD_TEST_PG_DSN is set). `audit_db.open()` opens another store on the same database (a restart, or a
  second writer). `pg_audit_db`: the PostgreSQL one alone (roles and privileges).

Other audit test modules keep their own fixtures in their own modules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from services.audit.store import AuditStore
from services.audit.store_postgres import PostgresAuditStore, pruner_role, writer_role
from services.audit.store_sqlite import SqliteAuditStore
from tests.support import PG_DSN, Database, open_database


class AuditDatabase(Database):
    """One test's audit database; `open()` may be called again (a restart or a second writer)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "audit.sqlite3", "tg_test_audit")

    async def open(self, dsn: str = PG_DSN, *, migrate: bool = True) -> AuditStore:
        if self.kind == "sqlite":
            return self.opened(await SqliteAuditStore.open(self.path))
        store = await PostgresAuditStore.open(
            dsn, schema=self.schema, min_size=1, max_size=4, migrate=migrate
        )
        return self.opened(store)

    @property
    def writer(self) -> str:
        """The PostgreSQL writer role of this test's schema."""
        return writer_role(self.schema)

    @property
    def pruner(self) -> str:
        """The PostgreSQL pruner role of this test's schema (retention's privileges)."""
        return pruner_role(self.schema)

    @property
    def service_login(self) -> str:
        """A LOGIN role a test may create as a member of the writer role (dropped after the test)."""
        return f"{self.schema}_service"

    def count(self, table: str) -> int:
        return int(self.execute(f"SELECT count(*) FROM {{schema}}.{table}")[0][0])

    async def aclose(self) -> None:
        await super().aclose()
        if self.kind == "postgres":
            with psycopg.connect(PG_DSN, autocommit=True) as pg:
                for role in (self.service_login, self.writer, self.pruner):
                    pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(params=["sqlite", "postgres"])
async def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditDatabase]:
    async with open_database(AuditDatabase, request.param, tmp_path) as database:
        yield database


@pytest.fixture
async def pg_audit_db(tmp_path: Path) -> AsyncIterator[AuditDatabase]:
    """PostgreSQL only (its roles and privileges)."""
    async with open_database(AuditDatabase, "postgres", tmp_path) as database:
        yield database


@pytest.fixture
async def audit_store(audit_db: AuditDatabase) -> AuditStore:
    return await audit_db.open()
