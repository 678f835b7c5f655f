"""PostgreSQL order store over a psycopg 3 async connection pool.

Quantities and prices are NUMERIC. Placement is one INSERT ... ON CONFLICT DO NOTHING RETURNING (with the event
row in the same statement; then a read of the winner), so the unique (account_id, client_order_id) constraint,
not a check-then-insert, decides races.
Writes are grouped (group commit: the kit's `Batcher` over `tradeguard.storage.postgres.write_batch`): while one
batch is being written on one pooled connection, the next writes queue up and then go together in one transaction, each inside its own SAVEPOINT, so a failing
write rolls back only itself (its order row and its event row together) and the others commit; a lone write goes
at once, in a transaction of its own. A caller is answered only after the COMMIT that includes its write returned.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar, cast

from psycopg import AsyncConnection, sql

from services.trading.model import Order, OrderStatus, PageCursor
from services.trading.store import ORDER_COLUMNS, order_from_row, order_to_row
from tradeguard.batching import DEFAULT_MAX_BATCH, Batcher, Outcome
from tradeguard.storage.migrations import Migration
from tradeguard.storage.postgres import Pool, open_pool, write_batch

__all__ = ["MIGRATIONS", "PostgresOrderStore"]

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


# Append-only: a released migration is never edited (see tradeguard.storage.migrations). Version 1 is the
# schema the store created before migrations existed (recorded then as schema_version 1).
_V1 = (
    """CREATE TABLE IF NOT EXISTS {schema}.orders (
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
    )""",
    "CREATE INDEX IF NOT EXISTS orders_account_time "
    "ON {schema}.orders (account_id, create_time_us DESC, order_id DESC)",
    """CREATE TABLE IF NOT EXISTS {schema}.order_events (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        order_id text COLLATE "C" NOT NULL REFERENCES {schema}.orders (order_id),
        status smallint NOT NULL,
        time_us bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS order_events_order ON {schema}.order_events (order_id, seq)",
)
MIGRATIONS = (Migration(1, "orders and their status events", _V1),)


def _params(order: Order) -> tuple[object, ...]:
    """ORDER_COLUMNS values with the decimals as `Decimal`, so they reach NUMERIC columns as numbers."""
    return tuple(
        Decimal(value) if column in ("quantity", "price") and isinstance(value, str) else value
        for column, value in zip(ORDER_COLUMNS, order_to_row(order), strict=True)
    )


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
        self.group: Batcher[Work, object] = Batcher(
            self._write_batch, max_batch=max_batch, name="postgres-orders-commit"
        )

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
        pool = await open_pool(dsn, schema, MIGRATIONS, min_size=min_size, max_size=max_size)
        return cls(pool, schema, max_batch=max_batch)

    @property
    def transactions(self) -> int:
        """Write transactions run so far (each one COMMIT, or one ROLLBACK if it failed)."""
        return self.group.batches

    @property
    def writes(self) -> int:
        """Writes handed to those transactions."""
        return self.group.items

    async def _write_batch(self, works: Sequence[Work]) -> list[Outcome[object]]:
        async with self._pool.connection() as conn:
            return await write_batch(conn, works)

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
