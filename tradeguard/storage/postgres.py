"""PostgreSQL as every production store opens it: a connection pool (autocommit; stores open their own
transactions), its tables in a schema of its own, brought up to date by its migrations (see
`tradeguard.storage.migrations`) in one transaction under an advisory lock."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from tradeguard.batching import Outcome
from tradeguard.storage.migrations import Migration, latest_version, pending

__all__ = ["Conn", "Pool", "check_schema_name", "migrate", "open_pool", "write_batch"]

Conn = AsyncConnection[tuple[Any, ...]]
Pool = AsyncConnectionPool[Conn]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_schema_name(schema: str) -> str:
    if _SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits and '_'")
    return schema


async def migrate(conn: Conn, schema: str, migrations: Sequence[Migration]) -> int:
    """Bring `schema` to the last of `migrations` in ONE transaction on `conn` (see the migrations module); the
    number of migrations run. Concurrent start-ups are serialised by a transaction-scoped advisory lock on the
    schema's name, so exactly one of them migrates and the others find the work done."""
    latest_version(migrations)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"tradeguard:{schema}",))
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        table = sql.Identifier(schema, "schema_version")
        await conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (version integer NOT NULL)").format(table))
        cur = await conn.execute(sql.SQL("SELECT max(version) FROM {}").format(table))
        row = await cur.fetchone()
        todo = pending(migrations, None if row is None else row[0], f"schema {schema}")
        for migration in todo:
            for step in migration.steps:
                if isinstance(step, str):
                    await conn.execute(sql.SQL(step).format(schema=sql.Identifier(schema)))
                else:
                    result = step(conn, schema)
                    if inspect.isawaitable(result):
                        await result
            await conn.execute(
                sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(table), (migration.version,)
            )
    return len(todo)


async def open_pool(
    dsn: str,
    schema: str,
    migrations: Sequence[Migration],
    *,
    min_size: int = 1,
    max_size: int = 10,
) -> Pool:
    """Open a pool and bring `schema` to the last of `migrations` (`migrate`); refuses (`SchemaTooNew`) a schema
    that a newer version of the code has migrated, and closes the pool again on any failure."""
    check_schema_name(schema)
    latest_version(migrations)
    pool: Pool = AsyncConnectionPool(
        dsn, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            await migrate(conn, schema, migrations)
    except BaseException:
        await pool.close()
        raise
    return pool


async def write_batch(
    conn: Conn, works: Sequence[Callable[[Conn], Awaitable[object]]]
) -> list[Outcome[object]]:
    """Group commit: all of `works` in one transaction on `conn`; raises if the transaction did not commit (then
    nothing of it is stored).

    Optimistic first: the writes run one after another with no savepoints (a SAVEPOINT and a RELEASE are two more
    round trips per write). If one of them fails, that transaction is rolled back, nothing of it stored, and the
    batch runs again with each write inside its own SAVEPOINT, so the failing write rolls back only itself and
    is reported in its `Outcome` while the others commit. A lone write's error is raised, as for a failed COMMIT.
    Works must therefore be safe to run twice when the first run was rolled back (they only touch the database)."""
    try:
        async with conn.transaction():
            return [Outcome(value=await work(conn)) for work in works]
    except Exception:
        if len(works) == 1 or conn.closed or conn.broken:
            raise
    outcomes: list[Outcome[object]] = []
    async with conn.transaction():
        for work in works:
            try:
                async with conn.transaction():  # nested: SAVEPOINT ... RELEASE, or ROLLBACK TO on error
                    value = await work(conn)
            except Exception as error:
                if conn.closed or conn.broken:
                    raise
                outcomes.append(Outcome(error=error))
            else:
                outcomes.append(Outcome(value=value))
    return outcomes
