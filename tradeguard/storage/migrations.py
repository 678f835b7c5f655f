"""Schema migrations: a store declares its schema as ordered steps, and every open brings the database to the last.

A store declares, once per backend:

    MIGRATIONS = (
        Migration(1, "create orders", ["CREATE TABLE {schema}.orders (...)", "CREATE INDEX ..."]),
        Migration(2, "add orders.venue", ["ALTER TABLE {schema}.orders ADD COLUMN venue TEXT"]),
    )

The schema's version is the last migration's. On open (`sqlite.connect`, `postgres.open_pool`):

- the version stored in the database's `schema_version` table (its greatest row; 0 when there is none) is read;
- a version **newer** than the code's is refused with `SchemaTooNew`, and nothing is changed (an older binary
  must never write to a schema it does not know);
- every migration after the stored version runs, in order, and one `schema_version` row per migration is added;
- all of it — the check, every step of every pending migration, the version rows — is ONE transaction: a step
  that fails rolls back every migration of this open, and the database stays at the version it had.

A step is SQL text, in which `{schema}.` names the store's own PostgreSQL schema (dropped for SQLite, so one
spelling serves both), or a function for data migrations: called with the `sqlite3.Connection` for SQLite, and
with the psycopg `AsyncConnection` and the schema name (and awaited) for PostgreSQL. Steps must not commit.
SQLite cannot switch `foreign_keys` inside a transaction: a step that rebuilds a table (the SQLite way to change
a column) starts with `PRAGMA defer_foreign_keys = ON`, so the keys are checked at the COMMIT instead.

Databases written before migrations existed have a `schema_version` table holding their version (1): they are
recognised by it and migrated forward from there, never recreated. Migrations are append-only: a released
migration is never edited, only followed by a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Migration", "SchemaTooNew", "Step", "latest_version", "pending"]

Step = str | Callable[..., Any]
"""SQL text (`{schema}.` for the store's schema) or a function run inside the migration's transaction."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    steps: Sequence[Step]

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"migration versions start at 1, not {self.version}")
        if not self.steps:
            raise ValueError(f"migration {self.version} ({self.description}) has no steps")


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer version of the code than the one running: refused, nothing changed."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(
            f"{where}: database schema version {found} is newer than this code ({known}); "
            "run the newer version of the service, or restore a backup taken before it migrated"
        )
        self.found = found
        self.known = known


def latest_version(migrations: Sequence[Migration]) -> int:
    """The version the migrations lead to; they must be numbered 1, 2, 3, … in order."""
    if not migrations:
        raise ValueError("a schema needs at least one migration")
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(
                f"migrations must be numbered 1, 2, 3, … in order: found {migration.version} "
                f"({migration.description}) where {expected} was expected"
            )
    return migrations[-1].version


def pending(migrations: Sequence[Migration], found: int | None, where: str) -> Sequence[Migration]:
    """The migrations to run on a database at version `found` (None: no version yet); refuses a newer one."""
    known = latest_version(migrations)
    current = found or 0
    if current > known:
        raise SchemaTooNew(where, current, known)
    return migrations[current:]
