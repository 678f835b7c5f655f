"""SQLite order store: WAL, synchronous=FULL, writes grouped into BEGIN IMMEDIATE transactions (group commit).

All database work runs on the kit's `SqliteWorker` (one thread owns the connection), so the event loop never
blocks on disk. Writes go through the kit's `Batcher` over `SqliteWorker.write_batch` (group commit): while one
transaction is being written, the next writes queue up and then go together in one transaction, each inside its
own SAVEPOINT (a failing write rolls back only itself); a lone write goes at once. A caller is answered only
after the COMMIT that includes its write returned. A write whose batch has started runs to COMMIT or ROLLBACK
on that thread even if its caller is cancelled: nothing is ever half-written.
Reads run on the same thread, between transactions; but the idempotency lookup (`find`: made when a control
refused a new order, to answer a retry of a placed one) has a connection and thread of its own, so that it does
not wait behind the write batches (WAL: a reader sees the last commit and never blocks a writer).

Decimals are TEXT (exact); an account's open notional (account_exposure) is added to and taken from in Python as
`Decimal`s in a 200-digit context (exact: the default one keeps 28 digits), never by SQLite's arithmetic
(floating point). The control lock of services/trading/store.py is BEGIN IMMEDIATE. An admitted insert is three
statements: the INSERT, whose RETURNING also reads the account's open notional and whether an engaged switch
covers the order (the switches themselves are read only then), the order's event, and its notional added to the
account's.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TypeVar, cast

from services.trading.model import (
    Admission,
    Controls,
    KillScope,
    KillSwitch,
    Order,
    OrderStatus,
    PageCursor,
    format_decimal,
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
from services.trading.validation import EXACT
from tradeguard.batching import DEFAULT_MAX_BATCH, Batcher, Outcome
from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker

__all__ = ["MIGRATIONS", "SqliteOrderStore"]

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], object]

_add = EXACT.add  # open notionals summed exactly (the default context keeps 28 digits and rounds the rest)
_COLS = ", ".join(ORDER_COLUMNS)
_PLACEHOLDERS = ", ".join("?" for _ in ORDER_COLUMNS)

# Append-only: a released migration is never edited (see tradeguard.storage.migrations). Version 1 is the
# schema the store created before migrations existed (recorded then as schema_version 1).
_V1 = (
    """CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        client_order_id TEXT NOT NULL,
        symbol TEXT NOT NULL,
        side INTEGER NOT NULL CHECK (side IN (1, 2)),
        type INTEGER NOT NULL CHECK (type IN (1, 2)),
        time_in_force INTEGER NOT NULL CHECK (time_in_force IN (1, 2, 3)),
        quantity TEXT NOT NULL,
        price TEXT,
        status INTEGER NOT NULL CHECK (status IN (1, 2, 3, 4)),
        create_time_us INTEGER NOT NULL,
        update_time_us INTEGER NOT NULL,
        UNIQUE (account_id, client_order_id)
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS orders_account_time "
    "ON orders (account_id, create_time_us DESC, order_id DESC)",
    """CREATE TABLE IF NOT EXISTS order_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id TEXT NOT NULL REFERENCES orders (order_id),
        status INTEGER NOT NULL,
        time_us INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS order_events_order ON order_events (order_id, seq)",
)
_V2 = (
    "ALTER TABLE orders ADD COLUMN notional TEXT",
    "ALTER TABLE orders ADD COLUMN api_key_id TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX IF NOT EXISTS orders_open ON orders (account_id) WHERE status = 1",
    """CREATE TABLE IF NOT EXISTS kill_switches (
        switch_id TEXT PRIMARY KEY,
        scope INTEGER NOT NULL CHECK (scope IN (1, 2, 3, 4)),
        value TEXT NOT NULL,
        reason TEXT NOT NULL,
        engaged_by TEXT NOT NULL,
        engaged_at_us INTEGER NOT NULL,
        released_by TEXT NOT NULL DEFAULT '',
        released_at_us INTEGER,
        release_reason TEXT NOT NULL DEFAULT ''
    ) STRICT""",
    "CREATE UNIQUE INDEX IF NOT EXISTS kill_switches_engaged ON kill_switches (scope, value) "
    "WHERE released_at_us IS NULL",
    """CREATE TABLE IF NOT EXISTS risk_overrides (
        account_id TEXT PRIMARY KEY,
        limits TEXT NOT NULL,
        updated_by TEXT NOT NULL,
        updated_at_us INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS reference_prices (
        symbol TEXT PRIMARY KEY,
        price TEXT NOT NULL,
        at_us INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS control (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    ) STRICT""",
    "INSERT INTO control (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
)


def _backfill_exposure(conn: sqlite3.Connection) -> None:
    totals: dict[str, Decimal] = {}
    for account, notional in conn.execute(_OPEN_NOTIONALS_ALL):
        totals[account] = _add(totals.get(account, Decimal(0)), Decimal(notional))
    conn.executemany(
        "INSERT INTO account_exposure (account_id, open_notional) VALUES (?, ?)",
        [(account, format_decimal(total)) for account, total in totals.items()],
    )


_OPEN_NOTIONALS_ALL = "SELECT account_id, notional FROM orders WHERE status = 1 AND notional IS NOT NULL"
_V3 = (
    """CREATE TABLE IF NOT EXISTS account_exposure (
        account_id TEXT PRIMARY KEY,
        open_notional TEXT NOT NULL
    ) STRICT""",
    _backfill_exposure,
)
MIGRATIONS = (
    Migration(1, "orders and their status events", _V1),
    Migration(2, "pre-trade controls: order notional and API key; kill switches, overrides, prices", _V2),
    Migration(3, "each account's open notional, kept with its orders (the credit check reads one row)", _V3),
)

_INSERT = (
    f"INSERT INTO orders ({_COLS}) VALUES ({_PLACEHOLDERS}) "  # noqa: S608 - constant column names
    f"ON CONFLICT (account_id, client_order_id) DO NOTHING RETURNING {_COLS}"
)
_SELECT_BY_CLIENT_ID = f"SELECT {_COLS} FROM orders WHERE account_id = ? AND client_order_id = ?"  # noqa: S608
_SELECT = f"SELECT {_COLS} FROM orders WHERE account_id = ? AND order_id = ?"  # noqa: S608
_TRANSITION = (
    "UPDATE orders SET status = ?, update_time_us = ? "  # noqa: S608 - constant column names
    f"WHERE account_id = ? AND order_id = ? AND status = ? RETURNING {_COLS}"
)
_SWITCH_COLS = ", ".join(SWITCH_COLUMNS)
# the engaged switches that cover an order (account, API key, symbol)
_SWITCHES_COVERING = (
    "kill_switches WHERE released_at_us IS NULL AND (scope = 1 "
    "OR (scope = 2 AND value = ?) OR (scope = 3 AND value = ?) OR (scope = 4 AND value = ?))"
)
# the admitted insert, returning with the row (one statement) the account's open notional and whether any engaged
# switch covers the order (their scopes and values are read only then: _COVERING)
_INSERT_ADMITTED = (
    f"INSERT INTO orders ({_COLS}, notional, api_key_id) "  # noqa: S608 - constant column names
    f"VALUES ({_PLACEHOLDERS}, ?, ?) ON CONFLICT (account_id, client_order_id) DO NOTHING RETURNING {_COLS}, "
    "(SELECT open_notional FROM account_exposure WHERE account_id = ?), "
    f"EXISTS (SELECT 1 FROM {_SWITCHES_COVERING})"
)
_COVERING = f"SELECT scope, value FROM {_SWITCHES_COVERING}"  # noqa: S608 - constant
_EXPOSURE = "SELECT open_notional FROM account_exposure WHERE account_id = ?"
_SET_EXPOSURE = (
    "INSERT INTO account_exposure (account_id, open_notional) VALUES (?, ?) "
    "ON CONFLICT (account_id) DO UPDATE SET open_notional = excluded.open_notional"
)
_NOTIONAL_OF = "SELECT notional FROM orders WHERE order_id = ?"


def _existing(conn: sqlite3.Connection, order: Order) -> Order:
    existing = conn.execute(_SELECT_BY_CLIENT_ID, (order.account_id, order.client_order_id)).fetchone()
    if existing is None:  # cannot happen inside BEGIN IMMEDIATE; never report a phantom order
        raise RuntimeError("insert conflicted but no existing order was found")
    return order_from_row(existing)


def _exposure(conn: sqlite3.Connection, account_id: str) -> Decimal:
    row = conn.execute(_EXPOSURE, (account_id,)).fetchone()
    return Decimal(0) if row is None else Decimal(row[0])


def _add_exposure(conn: sqlite3.Connection, account_id: str, delta: Decimal) -> None:
    conn.execute(_SET_EXPOSURE, (account_id, format_decimal(_add(_exposure(conn, account_id), delta))))


_ENGAGED = f"SELECT {_SWITCH_COLS} FROM kill_switches WHERE released_at_us IS NULL"  # noqa: S608
_SCOPE_FILTER = {
    KillScope.GLOBAL: "",
    KillScope.ACCOUNT: " AND account_id = ?",
    KillScope.API_KEY: " AND api_key_id = ?",
    KillScope.SYMBOL: " AND symbol = ?",
}
_BUMP = "UPDATE control SET version = version + 1 WHERE id = 1"
_EVENT = "INSERT INTO order_events (order_id, status, time_us) VALUES (?, ?, ?)"
_LIST_FIRST = (
    f"SELECT {_COLS} FROM orders WHERE account_id = ? "  # noqa: S608
    "ORDER BY create_time_us DESC, order_id DESC LIMIT ?"
)
_LIST_AFTER = (
    f"SELECT {_COLS} FROM orders WHERE account_id = ? "  # noqa: S608
    "AND (create_time_us < ? OR (create_time_us = ? AND order_id < ?)) "
    "ORDER BY create_time_us DESC, order_id DESC LIMIT ?"
)


class SqliteOrderStore:
    def __init__(
        self, worker: SqliteWorker, *, max_batch: int = DEFAULT_MAX_BATCH, reader: SqliteWorker | None = None
    ) -> None:
        self.worker = worker
        # the idempotency lookup's own connection (WAL: it never waits for a write batch), its lookups batched
        self.reader = reader
        self._lookups: Batcher[tuple[str, str], Order | None] | None = (
            None
            if reader is None
            else Batcher(self._find_batch, max_batch=max(max_batch, 64), name="sqlite-find")
        )
        self._closed = False
        self.path = worker.path
        self.group: Batcher[Work, object] = Batcher(
            worker.write_batch, max_batch=max_batch, name="sqlite-orders-commit"
        )

    @classmethod
    async def open(cls, path: Path, *, max_batch: int = DEFAULT_MAX_BATCH) -> SqliteOrderStore:
        """Open (creating if needed) the store at `path`; `max_batch=1` makes every write its own transaction."""
        worker = await SqliteWorker.open(path, MIGRATIONS, name="sqlite-orders")
        try:
            reader = await SqliteWorker.open(path, MIGRATIONS, name="sqlite-orders-read")
        except BaseException:
            await worker.close()
            raise
        return cls(worker, max_batch=max_batch, reader=reader)

    @property
    def transactions(self) -> int:
        """Write transactions run so far (each one COMMIT, or one ROLLBACK if it failed)."""
        return self.group.batches

    @property
    def writes(self) -> int:
        """Writes handed to those transactions."""
        return self.group.items

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the order store is closed")
        return await self.worker.run(work)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return cast(T, await self.group.submit(work))

    async def insert_if_absent(self, order: Order, admission: Admission | None = None) -> tuple[Order, bool]:
        row = order_to_row(order)
        if admission is not None:
            return await self._write(self._admitted(order, row, admission))

        def work(conn: sqlite3.Connection) -> tuple[Order, bool]:
            inserted = conn.execute(_INSERT, row).fetchall()
            if inserted:
                conn.execute(_EVENT, (order.order_id, int(order.status), order.create_time_us))
                return order_from_row(inserted[0]), True
            return _existing(conn, order), False

        return await self._write(work)

    @staticmethod
    def _admitted(
        order: Order, row: tuple[object, ...], admission: Admission
    ) -> Callable[[sqlite3.Connection], tuple[Order, bool]]:
        """The admitted insert: inserted first (an existing order is returned, never admitted again), then the
        covering switches and the account's open notional read and `admit` called; its refusal rolls the insert
        back with the rest of this write (its savepoint, or its transaction). BEGIN IMMEDIATE is the lock."""
        notional = admission.notional
        account = order.account_id
        scope_values = (account, admission.api_key_id, order.symbol)
        params = (
            *row,
            None if notional is None else format_decimal(notional),
            admission.api_key_id,
            account,
            *scope_values,
        )

        def work(conn: sqlite3.Connection) -> tuple[Order, bool]:
            inserted = conn.execute(_INSERT_ADMITTED, params).fetchone()
            if inserted is None:
                return _existing(conn, order), False
            *columns, open_notional, covered = inserted
            covering: list[tuple[KillScope, str]] = (
                [(KillScope(scope), value) for scope, value in conn.execute(_COVERING, scope_values)]
                if covered
                else []
            )
            exposure = Decimal(0) if open_notional is None else Decimal(open_notional)
            admission.admit(covering, exposure)
            conn.execute(_EVENT, (order.order_id, int(order.status), order.create_time_us))
            if notional is not None and order.status is OrderStatus.OPEN:
                conn.execute(_SET_EXPOSURE, (account, format_decimal(_add(exposure, notional))))
            return order_from_row(tuple(columns)), True

        return work

    async def find(self, account_id: str, client_order_id: str) -> Order | None:
        def work(conn: sqlite3.Connection) -> Order | None:
            row = conn.execute(_SELECT_BY_CLIENT_ID, (account_id, client_order_id)).fetchone()
            return None if row is None else order_from_row(row)

        if self._lookups is None:
            return await self._run(work)
        if self._closed:
            raise RuntimeError("the order store is closed")
        return await self._lookups.submit((account_id, client_order_id))

    async def _find_batch(self, keys: Sequence[tuple[str, str]]) -> list[Outcome[Order | None]]:
        """Lookups queued meanwhile, in one hop to the reader's thread (one thread hop per call costs more CPU
        than the lookup itself)."""
        assert self.reader is not None

        def work(conn: sqlite3.Connection) -> list[Outcome[Order | None]]:
            outcomes: list[Outcome[Order | None]] = []
            for key in keys:
                row = conn.execute(_SELECT_BY_CLIENT_ID, key).fetchone()
                outcomes.append(Outcome(value=None if row is None else order_from_row(row)))
            return outcomes

        return await self.reader.run(work)

    async def engage(self, switch: KillSwitch) -> tuple[KillSwitch, int]:
        scope_params: tuple[str, ...] = () if switch.scope is KillScope.GLOBAL else (switch.value,)
        now = switch.engaged_at_us

        def work(conn: sqlite3.Connection) -> tuple[KillSwitch, int]:
            row = conn.execute(
                _ENGAGED + " AND scope = ? AND value = ?", (int(switch.scope), switch.value)
            ).fetchone()
            if row is None:
                conn.execute(
                    f"INSERT INTO kill_switches ({_SWITCH_COLS}) "  # noqa: S608 - constant column names
                    f"VALUES ({', '.join('?' for _ in SWITCH_COLUMNS)})",
                    engaged_row(switch, now),
                )
                engaged = switch
            else:
                engaged = switch_from_row(row)
            cancelled = conn.execute(
                "UPDATE orders SET status = 2, update_time_us = ? "  # noqa: S608 - constant filter
                f"WHERE status = 1{_SCOPE_FILTER[switch.scope]} RETURNING order_id, account_id, notional",
                (now, *scope_params),
            ).fetchall()
            conn.executemany(
                _EVENT, [(order_id, int(OrderStatus.CANCELED), now) for order_id, _, _ in cancelled]
            )
            released: dict[str, Decimal] = {}
            for _, account, notional in cancelled:
                if notional is not None:
                    released[account] = _add(released.get(account, Decimal(0)), Decimal(notional))
            for account, total in released.items():
                _add_exposure(conn, account, -total)
            conn.execute(_BUMP)
            return engaged, len(cancelled)

        return await self._write(work)

    async def release(
        self, scope: KillScope, value: str, released_by: str, reason: str, now_us: int
    ) -> KillSwitch | None:
        def work(conn: sqlite3.Connection) -> KillSwitch | None:
            row = conn.execute(
                "UPDATE kill_switches SET released_by = ?, released_at_us = ?, release_reason = ? "  # noqa: S608
                f"WHERE scope = ? AND value = ? AND released_at_us IS NULL RETURNING {_SWITCH_COLS}",
                (released_by, now_us, reason, int(scope), value),
            ).fetchone()
            if row is None:
                return None
            conn.execute(_BUMP)
            return switch_from_row(row)

        return await self._write(work)

    async def kill_switches(self, include_released: bool = False) -> builtins.list[KillSwitch]:
        def work(conn: sqlite3.Connection) -> builtins.list[KillSwitch]:
            rows = conn.execute(_ENGAGED + " ORDER BY engaged_at_us, switch_id").fetchall()
            if include_released:
                rows += conn.execute(
                    f"SELECT {_SWITCH_COLS} FROM kill_switches WHERE released_at_us IS NOT NULL "  # noqa: S608
                    "ORDER BY released_at_us DESC, switch_id DESC LIMIT ?",
                    (MAX_RELEASED_LISTED,),
                ).fetchall()
            return [switch_from_row(row) for row in rows]

        return await self._run(work)

    async def set_override(self, account_id: str, limits_json: str | None, by: str, now_us: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            if limits_json is None:
                conn.execute("DELETE FROM risk_overrides WHERE account_id = ?", (account_id,))
            else:
                conn.execute(
                    "INSERT INTO risk_overrides (account_id, limits, updated_by, updated_at_us) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET limits = excluded.limits, "
                    "updated_by = excluded.updated_by, updated_at_us = excluded.updated_at_us",
                    (account_id, limits_json, by, now_us),
                )
            conn.execute(_BUMP)

        await self._write(work)

    async def set_reference_price(self, symbol: str, price: Decimal, at_us: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO reference_prices (symbol, price, at_us) VALUES (?, ?, ?) "
                "ON CONFLICT (symbol) DO UPDATE SET price = excluded.price, at_us = excluded.at_us "
                "WHERE excluded.at_us >= reference_prices.at_us",
                (symbol, format_decimal(price), at_us),
            )
            conn.execute(_BUMP)

        await self._write(work)

    async def control_version(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT version FROM control WHERE id = 1").fetchone()[0])

        return await self._run(work)

    async def controls(self) -> Controls:
        def work(conn: sqlite3.Connection) -> Controls:
            conn.execute("BEGIN")  # one snapshot for all four reads
            try:
                version = int(conn.execute("SELECT version FROM control WHERE id = 1").fetchone()[0])
                switches = [switch_from_row(row) for row in conn.execute(_ENGAGED)]
                overrides = dict(conn.execute("SELECT account_id, limits FROM risk_overrides").fetchall())
                prices = {
                    symbol: (to_decimal(price), at_us)
                    for symbol, price, at_us in conn.execute(
                        "SELECT symbol, price, at_us FROM reference_prices"
                    )
                }
            finally:
                conn.execute("COMMIT")
            return Controls(version, switches, overrides, prices)

        return await self._run(work)

    async def get(self, account_id: str, order_id: str) -> Order | None:
        def work(conn: sqlite3.Connection) -> Order | None:
            row = conn.execute(_SELECT, (account_id, order_id)).fetchone()
            return None if row is None else order_from_row(row)

        return await self._run(work)

    async def transition(
        self, account_id: str, order_id: str, from_status: OrderStatus, to_status: OrderStatus, now_us: int
    ) -> Order | None:
        def work(conn: sqlite3.Connection) -> Order | None:
            rows = conn.execute(
                _TRANSITION, (int(to_status), now_us, account_id, order_id, int(from_status))
            ).fetchall()
            if not rows:
                return None
            conn.execute(_EVENT, (order_id, int(to_status), now_us))
            if from_status is OrderStatus.OPEN and to_status is not OrderStatus.OPEN:
                (notional,) = conn.execute(_NOTIONAL_OF, (order_id,)).fetchone()
                if notional is not None:
                    _add_exposure(conn, account_id, -Decimal(notional))
            return order_from_row(rows[0])

        return await self._write(work)

    async def list(self, account_id: str, limit: int, before: PageCursor | None) -> builtins.list[Order]:
        def work(conn: sqlite3.Connection) -> builtins.list[Order]:
            if before is None:
                rows = conn.execute(_LIST_FIRST, (account_id, limit)).fetchall()
            else:
                rows = conn.execute(
                    _LIST_AFTER,
                    (account_id, before.create_time_us, before.create_time_us, before.order_id, limit),
                ).fetchall()
            return [order_from_row(row) for row in rows]

        return await self._run(work)

    async def close(self) -> None:
        """Refuse new work, let the queued writes commit, then close the connection."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.group.close()
        finally:
            try:
                await self.worker.close()
            finally:
                if self._lookups is not None:
                    await self._lookups.close()
                if self.reader is not None:
                    await self.reader.close()
