"""Schema migrations on real SQLite and real PostgreSQL: a fresh database gets every step, an older one the missing
steps with its data kept, a newer one is refused untouched, and a failing step rolls back every step of the open."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from psycopg import sql

from tests.support import PG_DSN, Database, open_database
from tradeguard.storage.migrations import Migration, SchemaTooNew, latest_version
from tradeguard.storage.postgres import Conn, open_pool
from tradeguard.storage.sqlite import SqliteWorker


def _sqlite_fill_upper(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE notes SET upper = upper(body)")


async def _pg_fill_upper(conn: Conn, schema: str) -> None:
    await conn.execute(sql.SQL("UPDATE {} SET upper = upper(body)").format(sql.Identifier(schema, "notes")))


def migrations(kind: str) -> tuple[Migration, ...]:
    """Version 1: a table; version 2: a column filled by a data step (SQL-only for SQLite, a function for both)."""
    fill = _sqlite_fill_upper if kind == "sqlite" else _pg_fill_upper
    return (
        Migration(1, "notes", ["CREATE TABLE {schema}.notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"]),
        Migration(2, "notes.upper", ["ALTER TABLE {schema}.notes ADD COLUMN upper TEXT", fill]),
    )


FAILING = Migration(3, "fails half way", ["CREATE TABLE {schema}.half (x INTEGER)", "THIS IS NOT SQL"])


class Db(Database):
    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "m.db", "tg_mig_test")

    async def open(self, steps: Sequence[Migration]) -> None:
        """Open (and so migrate) the database with `steps`, then close it again."""
        if self.kind == "sqlite":
            worker = await SqliteWorker.open(self.path, steps)
            await worker.close()
        else:
            pool = await open_pool(PG_DSN, self.schema, steps, max_size=2)
            await pool.close()

    def versions(self) -> list[int]:
        return [v for (v,) in self.execute("SELECT version FROM {schema}.schema_version ORDER BY version")]

    def tables(self) -> set[str]:
        if self.kind == "sqlite":
            rows = self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = self.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (self.schema,)
            )
        return {name for (name,) in rows}

    def write_v1_as_old_code_did(self) -> None:
        """What today's stores wrote before migrations existed: their tables and ONE schema_version row (1)."""
        if self.kind == "postgres":
            self.execute("CREATE SCHEMA {schema}")
        self.execute("CREATE TABLE {schema}.schema_version (version integer NOT NULL)")
        self.execute("INSERT INTO {schema}.schema_version (version) VALUES (1)")
        self.execute("CREATE TABLE {schema}.notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        self.execute("INSERT INTO {schema}.notes (id, body) VALUES (1, 'kept'), (2, 'also kept')")


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    async with open_database(Db, request.param, tmp_path) as database:
        yield database


async def test_a_fresh_database_gets_every_migration(db: Db) -> None:
    await db.open(migrations(db.kind))
    assert db.versions() == [1, 2]
    assert {"notes", "schema_version"} <= db.tables()
    db.execute("INSERT INTO {schema}.notes (id, body, upper) VALUES (1, 'a', 'A')")
    await db.open(migrations(db.kind))  # reopening runs nothing again
    assert db.versions() == [1, 2]
    assert db.execute("SELECT body, upper FROM {schema}.notes") == [("a", "A")]


async def test_a_database_of_the_old_code_is_recognised_and_migrated_with_its_data(db: Db) -> None:
    db.write_v1_as_old_code_did()
    await db.open(migrations(db.kind))
    assert db.versions() == [1, 2]
    assert db.execute("SELECT id, body, upper FROM {schema}.notes ORDER BY id") == [
        (1, "kept", "KEPT"),
        (2, "also kept", "ALSO KEPT"),
    ]


async def test_a_newer_schema_is_refused_and_left_untouched(db: Db) -> None:
    await db.open(migrations(db.kind))
    db.execute("INSERT INTO {schema}.notes (id, body) VALUES (7, 'x')")
    with pytest.raises(SchemaTooNew, match="version 2 is newer than this code \\(1\\)") as refused:
        await db.open(migrations(db.kind)[:1])
    assert (refused.value.found, refused.value.known) == (2, 1)
    assert db.versions() == [1, 2]
    assert db.execute("SELECT id, body FROM {schema}.notes") == [(7, "x")]


async def test_a_failing_step_rolls_back_every_migration_of_the_open(db: Db) -> None:
    # A fresh database: migrations 1 and 2 succeed, 3 fails half way: nothing at all is left.
    with pytest.raises(Exception, match="syntax error"):
        await db.open((*migrations(db.kind), FAILING))
    assert not ({"notes", "half", "schema_version"} & db.tables())

    # An old database: it stays at version 1 with its data, without migration 2's column.
    db.write_v1_as_old_code_did()
    with pytest.raises(Exception, match="syntax error"):
        await db.open((*migrations(db.kind), FAILING))
    assert db.versions() == [1]
    assert db.execute("SELECT * FROM {schema}.notes ORDER BY id") == [(1, "kept"), (2, "also kept")]
    assert "half" not in db.tables()

    # Once the step is fixed, the same database migrates.
    fixed = Migration(3, "fixed", ["CREATE TABLE {schema}.half (x INTEGER)"])
    await db.open((*migrations(db.kind), fixed))
    assert db.versions() == [1, 2, 3] and "half" in db.tables()


async def test_concurrent_postgres_start_ups_migrate_once(tmp_path: Path) -> None:
    async with open_database(Db, "postgres", tmp_path) as db:
        await asyncio.gather(*(db.open(migrations("postgres")) for _ in range(4)))
        assert db.versions() == [1, 2]


@pytest.mark.parametrize(
    ("numbers", "message"),
    [
        ((), "at least one"),
        ((2,), r"found 2 \(m2\) where 1"),
        ((1, 3), r"found 3 \(m3\) where 2"),
        ((1, 1), r"found 1 \(m1\) where 2"),
    ],
)
def test_migrations_must_be_numbered_in_order(numbers: tuple[int, ...], message: str) -> None:
    steps = tuple(Migration(n, f"m{n}", ["SELECT 1"]) for n in numbers)
    with pytest.raises(ValueError, match=message):
        latest_version(steps)


def test_a_migration_needs_a_version_and_steps() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        Migration(0, "zero", ["SELECT 1"])
    with pytest.raises(ValueError, match="no steps"):
        Migration(1, "empty", [])
