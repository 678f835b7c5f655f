"""PostgreSQL as every production store opens it: a connection pool (autocommit; stores open their own
transactions), its tables in a schema of its own, created under an advisory lock and versioned."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

Pool = AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


async def open_pool(
    dsn: str,
    schema: str,
    ddl: Callable[[str], Sequence[sql.Composed]],
    schema_version: int,
    *,
    min_size: int = 1,
    max_size: int = 10,
) -> Pool:
    """Open a pool and create `schema` with `ddl(schema)`, which must include a `schema_version(version)`
    table (all `IF NOT EXISTS`). Refuses a schema a newer version of the code has written."""
    if _SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits and '_'")
    pool: Pool = AsyncConnectionPool(
        dsn, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn, conn.transaction():
            # Serialise concurrent start-ups: CREATE ... IF NOT EXISTS is not safe against itself.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"tradeguard:{schema}",))
            for statement in ddl(schema):
                await conn.execute(statement)
            table = sql.Identifier(schema, "schema_version")
            cur = await conn.execute(sql.SQL("SELECT max(version) FROM {}").format(table))
            row = await cur.fetchone()
            version = None if row is None else row[0]
            if version is None:
                await conn.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(table), (schema_version,)
                )
            elif version > schema_version:
                raise RuntimeError(f"schema {schema} is at version {version}, newer than {schema_version}")
    except BaseException:
        await pool.close()
        raise
    return pool
