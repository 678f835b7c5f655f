"""PostgreSQL order store over a psycopg 3 async connection pool.

Quantities and prices are NUMERIC. Placement is one INSERT ... ON CONFLICT DO NOTHING RETURNING (with the event
row in the same statement; then a read of the winner), so the unique (account_id, client_order_id) constraint, not a check-then-insert, decides
races.
Writes are grouped (group commit, see `GroupCommit`): while one batch is being written on one pooled connection,
the next writes queue up and then go together in one transaction, each inside its own SAVEPOINT, so a failing
write rolls back only itself (its order row and its event row together) and the others commit; a lone write goes
at once, in a transaction of its own. A caller is answered only after the COMMIT that includes its write returned.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar, cast

from psycopg import AsyncConnection, sql

from services.trading.group_commit import DEFAULT_MAX_BATCH, GroupCommit, Outcome
from services.trading.model import Order, OrderStatus, PageCursor
from services.trading.store import ORDER_COLUMNS, SCHEMA_VERSION, order_from_row, order_to_row
from tradeguard.postgres import Pool, open_pool

__all__ = ["PostgresOrderStore"]

T = TypeVar("T")
Conn = AsyncConnection[tuple[Any, ...]]
Work = Callable[[Conn], Awaitable[object]]


def _statements(schema: str) -> dict[str, sql.Composed]:
    orders = sql.Identifier(schema, "orders")
    events = sql.Identifier(schema, "order_events")
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in ORDER_COLUMNS)
    params = sql.SQL(", ").join(sql.Placeholder() for _ in ORDER_COLUMNS)
    fmt = {"orders": orders, "events": events, "cols": cols, "params": params}
    return {
        # One statement (one round trip): the order row and, only if it was inserted, its event row.
        "insert": sql.SQL(
            "WITH inserted AS (INSERT INTO {orders} ({cols}) VALUES ({params}) "
            "ON CONFLICT (account_id, client_order_id) DO NOTHING RETURNING {cols}), "
            "event AS (INSERT INTO {events} (order_id, status, time_us) "
            "SELECT order_id, status, create_time_us FROM inserted) "
            "SELECT {cols} FROM inserted"
        ).format(**fmt),
        "select_by_client_id": sql.SQL(
            "SELECT {cols} FROM {orders} WHERE account_id = %s AND client_order_id = %s"
        ).format(**fmt),
        "select": sql.SQL("SELECT {cols} FROM {orders} WHERE account_id = %s AND order_id = %s").format(
            **fmt
        ),
        "transition": sql.SQL(
            "UPDATE {orders} SET status = %s, update_time_us = %s "
            "WHERE account_id = %s AND order_id = %s AND status = %s RETURNING {cols}"
        ).format(**fmt),
        "event": sql.SQL("INSERT INTO {events} (order_id, status, time_us) VALUES (%s, %s, %s)").format(
            **fmt
        ),
        "list_first": sql.SQL(
            "SELECT {cols} FROM {orders} WHERE account_id = %s "
            "ORDER BY create_time_us DESC, order_id DESC LIMIT %s"
        ).format(**fmt),
        "list_after": sql.SQL(
            "SELECT {cols} FROM {orders} WHERE account_id = %s AND (create_time_us, order_id) < (%s, %s) "
            "ORDER BY create_time_us DESC, order_id DESC LIMIT %s"
        ).format(**fmt),
    }


def _ddl(schema: str) -> list[sql.Composed]:
    fmt = {
        "schema": sql.Identifier(schema),
        "version": sql.Identifier(schema, "schema_version"),
        "orders": sql.Identifier(schema, "orders"),
        "events": sql.Identifier(schema, "order_events"),
    }
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {schema}").format(**fmt),
        sql.SQL("CREATE TABLE IF NOT EXISTS {version} (version integer NOT NULL)").format(**fmt),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {orders} (
                order_id text COLLATE "C" PRIMARY KEY,
                account_id text NOT NULL,
                client_order_id text NOT NULL,
                symbol text NOT NULL,
                side smallint NOT NULL CHECK (side IN (1, 2)),
                type smallint NOT NULL CHECK (type IN (1, 2)),
                time_in_force smallint NOT NULL CHECK (time_in_force IN (1, 2, 3)),
                quantity numeric NOT NULL CHECK (quantity > 0),
                price numeric CHECK (price > 0),
                status smallint NOT NULL CHECK (status IN (1, 2, 3, 4)),
                create_time_us bigint NOT NULL,
                update_time_us bigint NOT NULL,
                UNIQUE (account_id, client_order_id)
            )"""
        ).format(**fmt),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS orders_account_time "
            "ON {orders} (account_id, create_time_us DESC, order_id DESC)"
        ).format(**fmt),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {events} (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                order_id text COLLATE "C" NOT NULL REFERENCES {orders} (order_id),
                status smallint NOT NULL,
                time_us bigint NOT NULL
            )"""
        ).format(**fmt),
        sql.SQL("CREATE INDEX IF NOT EXISTS order_events_order ON {events} (order_id, seq)").format(**fmt),
    ]


def _params(order: Order) -> tuple[object, ...]:
    """ORDER_COLUMNS values with the decimals as `Decimal`, so they reach NUMERIC columns as numbers."""
    return tuple(
        Decimal(value) if column in ("quantity", "price") and isinstance(value, str) else value
        for column, value in zip(ORDER_COLUMNS, order_to_row(order), strict=True)
    )


async def _write_batch(conn: Conn, works: Sequence[Work]) -> list[Outcome]:
    """All of `works` in one transaction; raises if the transaction did not commit.

    Optimistic first: the writes run one after another with no savepoints (a SAVEPOINT and a RELEASE are two more
    round trips per write). If one of them fails, that transaction is rolled back, nothing of it stored, and the
    batch runs again with each write inside its own SAVEPOINT, so the failing write rolls back only itself and
    is reported in its `Outcome` while the others commit. A lone write's error is raised, as for a failed COMMIT.
    """
    try:
        async with conn.transaction():
            return [Outcome(value=await work(conn)) for work in works]
    except Exception:
        if len(works) == 1 or conn.closed or conn.broken:
            raise
    outcomes: list[Outcome] = []
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


class PostgresOrderStore:
    def __init__(
        self,
        pool: Pool,
        schema: str,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._pool = pool
        self.schema = schema
        self._sql = _statements(schema)
        self.group: GroupCommit[Work] = GroupCommit(self._write_batch, max_batch=max_batch)

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = "tradeguard_trading",
        min_size: int = 1,
        max_size: int = 10,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> PostgresOrderStore:
        """Open the pool and create the schema; `max_batch=1` makes every write its own transaction."""
        pool = await open_pool(dsn, schema, _ddl, SCHEMA_VERSION, min_size=min_size, max_size=max_size)
        return cls(pool, schema, max_batch=max_batch)

    @property
    def transactions(self) -> int:
        """Write transactions run so far (each one COMMIT, or one ROLLBACK if it failed)."""
        return self.group.transactions

    @property
    def writes(self) -> int:
        """Writes handed to those transactions."""
        return self.group.writes

    async def _write_batch(self, works: Sequence[Work]) -> list[Outcome]:
        async with self._pool.connection() as conn:
            return await _write_batch(conn, works)

    async def _write(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        return cast(T, await self.group.submit(work))

    async def insert_if_absent(self, order: Order) -> tuple[Order, bool]:
        params = _params(order)

        async def work(conn: Conn) -> tuple[Order, bool]:
            cur = await conn.execute(self._sql["insert"], params)
            inserted = await cur.fetchone()
            if inserted is not None:  # its event row went in with it
                return order_from_row(inserted), True
            # The conflicting row is committed (ON CONFLICT waited for it) or was written earlier in this
            # transaction (an earlier write of the same batch); either way this statement's snapshot sees it.
            cur = await conn.execute(
                self._sql["select_by_client_id"], (order.account_id, order.client_order_id)
            )
            existing = await cur.fetchone()
            if existing is None:
                raise RuntimeError("insert conflicted but no existing order was found")
            return order_from_row(existing), False

        return await self._write(work)

    async def get(self, account_id: str, order_id: str) -> Order | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["select"], (account_id, order_id))
            row = await cur.fetchone()
        return None if row is None else order_from_row(row)

    async def transition(
        self, account_id: str, order_id: str, from_status: OrderStatus, to_status: OrderStatus, now_us: int
    ) -> Order | None:
        async def work(conn: Conn) -> Order | None:
            cur = await conn.execute(
                self._sql["transition"], (int(to_status), now_us, account_id, order_id, int(from_status))
            )
            row = await cur.fetchone()
            if row is None:
                return None
            await conn.execute(self._sql["event"], (order_id, int(to_status), now_us))
            return order_from_row(row)

        return await self._write(work)

    async def list(self, account_id: str, limit: int, before: PageCursor | None) -> builtins.list[Order]:
        async with self._pool.connection() as conn:
            if before is None:
                cur = await conn.execute(self._sql["list_first"], (account_id, limit))
            else:
                cur = await conn.execute(
                    self._sql["list_after"], (account_id, before.create_time_us, before.order_id, limit)
                )
            rows = await cur.fetchall()
        return [order_from_row(row) for row in rows]

    async def close(self) -> None:
        """Refuse new writes, let the queued ones commit, then close the pool."""
        try:
            await self.group.close()
        finally:
            await self._pool.close()
