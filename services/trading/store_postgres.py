"""PostgreSQL order store over a psycopg 3 async connection pool.

Quantities and prices are NUMERIC. Placement is one INSERT ... ON CONFLICT DO NOTHING RETURNING (with the event
row in the same statement; then a read of the winner), so the unique (account_id, client_order_id) constraint,
not a check-then-insert, decides races.
Writes are grouped (group commit: the kit's `Batcher` over `tradeguard.storage.postgres.write_batch`): while one
batch is being written on one pooled connection, the next writes queue up and then go together in one transaction, each inside its own SAVEPOINT, so a failing
write rolls back only itself (its order row and its event row together) and the others commit; a lone write goes
at once, in a transaction of its own. A caller is answered only after the COMMIT that includes its write returned.

The control lock of services/trading/store.py is the `control` row, taken FOR UPDATE in a statement of its own
by every admitted insert and by every change of the controls (engage, release, overrides, prices: their UPDATE of
the version takes it). The batch holds it until its COMMIT (a savepoint rolled back gives it up again).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar, cast

from psycopg import AsyncConnection, sql

from services.trading.model import (
    Admission,
    Controls,
    KillScope,
    KillSwitch,
    Order,
    OrderStatus,
    PageCursor,
)
from services.trading.store import (
    MAX_RELEASED_LISTED,
    ORDER_COLUMNS,
    SWITCH_COLUMNS,
    engaged_row,
    order_from_row,
    order_to_row,
    switch_from_row,
    to_decimal,
)
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
    switches = sql.Identifier(schema, "kill_switches")
    control = sql.Identifier(schema, "control")
    switch_cols = sql.SQL(", ").join(sql.Identifier(c) for c in SWITCH_COLUMNS)
    more = {"switches": switches, "control": control, "switch_cols": switch_cols}
    scoped = {
        scope: sql.SQL(
            "WITH cancelled AS (UPDATE {orders} SET status = 2, update_time_us = %s "  # noqa: S608 - constant
            "WHERE status = 1" + where + " RETURNING order_id, account_id, notional), "
            "event AS (INSERT INTO {events} (order_id, status, time_us) SELECT order_id, 2, %s FROM cancelled), "
            "released AS (UPDATE {exposure} e SET open_notional = e.open_notional - r.total FROM "
            "(SELECT account_id, sum(notional) AS total FROM cancelled WHERE notional IS NOT NULL "
            "GROUP BY account_id) r WHERE e.account_id = r.account_id) "
            "SELECT count(*) FROM cancelled"
        ).format(**fmt, exposure=sql.Identifier(schema, "account_exposure"))
        for scope, where in (
            ("cancel_1", ""),
            ("cancel_2", " AND account_id = %s"),
            ("cancel_3", " AND api_key_id = %s"),
            ("cancel_4", " AND symbol = %s"),
        )
    }
    return {
        **scoped,
        "lock": sql.SQL("SELECT version FROM {control} WHERE id = 1 FOR UPDATE").format(**more),
        "bump": sql.SQL("UPDATE {control} SET version = version + 1 WHERE id = 1").format(**more),
        "version": sql.SQL("SELECT version FROM {control} WHERE id = 1").format(**more),
        "covering": sql.SQL(
            "SELECT scope, value, NULL FROM {switches} WHERE released_at_us IS NULL AND (scope = 1 "
            "OR (scope = 2 AND value = %s) OR (scope = 3 AND value = %s) OR (scope = 4 AND value = %s)) "
            "UNION ALL SELECT 0, '', coalesce((SELECT open_notional FROM {exposure} WHERE account_id = %s), 0)"
        ).format(**fmt, **more, exposure=sql.Identifier(schema, "account_exposure")),
        "add_exposure": sql.SQL(
            "INSERT INTO {exposure} AS e (account_id, open_notional) VALUES (%s, %s) "
            "ON CONFLICT (account_id) DO UPDATE SET open_notional = e.open_notional + excluded.open_notional"
        ).format(exposure=sql.Identifier(schema, "account_exposure")),
        "transition_open": sql.SQL(
            "WITH moved AS (UPDATE {orders} SET status = %s, update_time_us = %s "
            "WHERE account_id = %s AND order_id = %s AND status = 1 RETURNING {cols}, notional), "
            "released AS (UPDATE {exposure} e SET open_notional = e.open_notional - m.notional FROM moved m "
            "WHERE e.account_id = m.account_id AND m.notional IS NOT NULL) "
            "SELECT {cols} FROM moved"
        ).format(**fmt, exposure=sql.Identifier(schema, "account_exposure")),
        "insert_admitted": sql.SQL(
            "WITH inserted AS (INSERT INTO {orders} ({cols}, notional, api_key_id) VALUES ({params}, %s, %s) "
            "ON CONFLICT (account_id, client_order_id) DO NOTHING RETURNING {cols}), "
            "event AS (INSERT INTO {events} (order_id, status, time_us) "
            "SELECT order_id, status, create_time_us FROM inserted) "
            "SELECT {cols} FROM inserted"
        ).format(**fmt),
        "engaged": sql.SQL("SELECT {switch_cols} FROM {switches} WHERE released_at_us IS NULL").format(
            **more
        ),
        "engaged_one": sql.SQL(
            "SELECT {switch_cols} FROM {switches} WHERE released_at_us IS NULL AND scope = %s AND value = %s"
        ).format(**more),
        "insert_switch": sql.SQL("INSERT INTO {switches} ({switch_cols}) VALUES ({ps})").format(
            **more, ps=sql.SQL(", ").join(sql.Placeholder() for _ in SWITCH_COLUMNS)
        ),
        "release": sql.SQL(
            "UPDATE {switches} SET released_by = %s, released_at_us = %s, release_reason = %s "
            "WHERE scope = %s AND value = %s AND released_at_us IS NULL RETURNING {switch_cols}"
        ).format(**more),
        "released": sql.SQL(
            "SELECT {switch_cols} FROM {switches} WHERE released_at_us IS NOT NULL "
            "ORDER BY released_at_us DESC, switch_id DESC LIMIT %s"
        ).format(**more),
        "set_override": sql.SQL(
            "INSERT INTO {t} (account_id, limits, updated_by, updated_at_us) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (account_id) DO UPDATE SET limits = excluded.limits, "
            "updated_by = excluded.updated_by, updated_at_us = excluded.updated_at_us"
        ).format(t=sql.Identifier(schema, "risk_overrides")),
        "clear_override": sql.SQL("DELETE FROM {t} WHERE account_id = %s").format(
            t=sql.Identifier(schema, "risk_overrides")
        ),
        "overrides": sql.SQL("SELECT account_id, limits FROM {t}").format(
            t=sql.Identifier(schema, "risk_overrides")
        ),
        "set_price": sql.SQL(
            "INSERT INTO {t} AS p (symbol, price, at_us) VALUES (%s, %s, %s) "
            "ON CONFLICT (symbol) DO UPDATE SET price = excluded.price, at_us = excluded.at_us "
            "WHERE excluded.at_us >= p.at_us"
        ).format(t=sql.Identifier(schema, "reference_prices")),
        "prices": sql.SQL("SELECT symbol, price, at_us FROM {t}").format(
            t=sql.Identifier(schema, "reference_prices")
        ),
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
_V2 = (
    "ALTER TABLE {schema}.orders ADD COLUMN IF NOT EXISTS notional numeric",
    "ALTER TABLE {schema}.orders ADD COLUMN IF NOT EXISTS api_key_id text NOT NULL DEFAULT ''",
    "CREATE INDEX IF NOT EXISTS orders_open ON {schema}.orders (account_id) WHERE status = 1",
    """CREATE TABLE IF NOT EXISTS {schema}.kill_switches (
        switch_id text COLLATE "C" PRIMARY KEY,
        scope smallint NOT NULL CHECK (scope IN (1, 2, 3, 4)),
        value text NOT NULL,
        reason text NOT NULL,
        engaged_by text NOT NULL,
        engaged_at_us bigint NOT NULL,
        released_by text NOT NULL DEFAULT '',
        released_at_us bigint,
        release_reason text NOT NULL DEFAULT ''
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS kill_switches_engaged ON {schema}.kill_switches (scope, value) "
    "WHERE released_at_us IS NULL",
    """CREATE TABLE IF NOT EXISTS {schema}.risk_overrides (
        account_id text PRIMARY KEY,
        limits text NOT NULL,
        updated_by text NOT NULL,
        updated_at_us bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.reference_prices (
        symbol text PRIMARY KEY,
        price numeric NOT NULL CHECK (price > 0),
        at_us bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.control (
        id smallint PRIMARY KEY CHECK (id = 1),
        version bigint NOT NULL
    )""",
    "INSERT INTO {schema}.control (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
)
_V3 = (
    """CREATE TABLE IF NOT EXISTS {schema}.account_exposure (
        account_id text PRIMARY KEY,
        open_notional numeric NOT NULL
    )""",
    "INSERT INTO {schema}.account_exposure (account_id, open_notional) "
    "SELECT account_id, sum(notional) FROM {schema}.orders WHERE status = 1 AND notional IS NOT NULL "
    "GROUP BY account_id ON CONFLICT DO NOTHING",
)
MIGRATIONS = (
    Migration(1, "orders and their status events", _V1),
    Migration(2, "pre-trade controls: order notional and API key; kill switches, overrides, prices", _V2),
    Migration(3, "each account's open notional, kept with its orders (the credit check reads one row)", _V3),
)


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

    async def insert_if_absent(self, order: Order, admission: Admission | None = None) -> tuple[Order, bool]:
        params = _params(order)
        if admission is not None:
            return await self._write(self._admitted(order, params, admission))

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

    def _admitted(
        self, order: Order, params: tuple[object, ...], admission: Admission
    ) -> Callable[[Conn], Awaitable[tuple[Order, bool]]]:
        statements = self._sql

        async def work(conn: Conn) -> tuple[Order, bool]:
            # the lock in a statement of its own: the statements after it see what its previous holder committed
            await conn.execute(statements["lock"])
            cur = await conn.execute(
                statements["insert_admitted"], (*params, admission.notional, admission.api_key_id)
            )
            inserted = await cur.fetchone()
            if inserted is None:  # the key exists: that order, never admitted again
                cur = await conn.execute(
                    statements["select_by_client_id"], (order.account_id, order.client_order_id)
                )
                existing = await cur.fetchone()
                if existing is None:
                    raise RuntimeError("insert conflicted but no existing order was found")
                return order_from_row(existing), False
            cur = await conn.execute(
                statements["covering"],
                (order.account_id, admission.api_key_id, order.symbol, order.account_id),
            )
            covering: list[tuple[KillScope, str]] = []
            open_notional = Decimal(0)
            for scope, value, total in await cur.fetchall():
                if scope == 0:
                    open_notional = to_decimal(total)
                else:
                    covering.append((KillScope(scope), value))
            admission.admit(covering, open_notional)  # a refusal rolls the insert back with this write
            if admission.notional is not None and order.status is OrderStatus.OPEN:
                await conn.execute(statements["add_exposure"], (order.account_id, admission.notional))
            return order_from_row(inserted), True

        return work

    async def find(self, account_id: str, client_order_id: str) -> Order | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["select_by_client_id"], (account_id, client_order_id))
            row = await cur.fetchone()
        return None if row is None else order_from_row(row)

    async def engage(self, switch: KillSwitch) -> tuple[KillSwitch, int]:
        statements = self._sql
        scope_params: tuple[str, ...] = () if switch.scope is KillScope.GLOBAL else (switch.value,)
        now = switch.engaged_at_us

        async def work(conn: Conn) -> tuple[KillSwitch, int]:
            await conn.execute(statements["lock"])
            cur = await conn.execute(statements["engaged_one"], (int(switch.scope), switch.value))
            row = await cur.fetchone()
            if row is None:
                await conn.execute(
                    statements["insert_switch"],
                    engaged_row(switch, now),
                )
                engaged = switch
            else:
                engaged = switch_from_row(row)
            cur = await conn.execute(statements[f"cancel_{int(switch.scope)}"], (now, *scope_params, now))
            counted = await cur.fetchone()
            await conn.execute(statements["bump"])
            return engaged, 0 if counted is None else int(counted[0])

        return await self._write(work)

    async def release(
        self, scope: KillScope, value: str, released_by: str, reason: str, now_us: int
    ) -> KillSwitch | None:
        statements = self._sql

        async def work(conn: Conn) -> KillSwitch | None:
            cur = await conn.execute(statements["release"], (released_by, now_us, reason, int(scope), value))
            row = await cur.fetchone()
            if row is None:
                return None
            await conn.execute(statements["bump"])
            return switch_from_row(row)

        return await self._write(work)

    async def kill_switches(self, include_released: bool = False) -> builtins.list[KillSwitch]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL("{} ORDER BY engaged_at_us, switch_id").format(self._sql["engaged"])
            )
            rows = await cur.fetchall()
            if include_released:
                cur = await conn.execute(self._sql["released"], (MAX_RELEASED_LISTED,))
                rows += await cur.fetchall()
        return [switch_from_row(row) for row in rows]

    async def set_override(self, account_id: str, limits_json: str | None, by: str, now_us: int) -> None:
        statements = self._sql

        async def work(conn: Conn) -> None:
            if limits_json is None:
                await conn.execute(statements["clear_override"], (account_id,))
            else:
                await conn.execute(statements["set_override"], (account_id, limits_json, by, now_us))
            await conn.execute(statements["bump"])

        await self._write(work)

    async def set_reference_price(self, symbol: str, price: Decimal, at_us: int) -> None:
        statements = self._sql

        async def work(conn: Conn) -> None:
            await conn.execute(statements["set_price"], (symbol, price, at_us))
            await conn.execute(statements["bump"])

        await self._write(work)

    async def control_version(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["version"])
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def controls(self) -> Controls:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = await conn.execute(self._sql["version"])
            row = await cur.fetchone()
            assert row is not None
            cur = await conn.execute(self._sql["engaged"])
            switches = [switch_from_row(r) for r in await cur.fetchall()]
            cur = await conn.execute(self._sql["overrides"])
            overrides = {str(a): str(limits) for a, limits in await cur.fetchall()}
            cur = await conn.execute(self._sql["prices"])
            prices = {str(s): (to_decimal(p), int(at)) for s, p, at in await cur.fetchall()}
        return Controls(int(row[0]), switches, overrides, prices)

    async def get(self, account_id: str, order_id: str) -> Order | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["select"], (account_id, order_id))
            row = await cur.fetchone()
        return None if row is None else order_from_row(row)

    async def transition(
        self, account_id: str, order_id: str, from_status: OrderStatus, to_status: OrderStatus, now_us: int
    ) -> Order | None:
        leaves_open = from_status is OrderStatus.OPEN and to_status is not OrderStatus.OPEN

        async def work(conn: Conn) -> Order | None:
            if leaves_open:  # and its notional leaves the account's exposure, in the same statement
                cur = await conn.execute(
                    self._sql["transition_open"], (int(to_status), now_us, account_id, order_id)
                )
            else:
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
