"""SQLite order store: WAL, synchronous=FULL, writes grouped into BEGIN IMMEDIATE transactions (group commit).

All database work runs on the kit's `SqliteWorker` (one thread owns the connection), so the event loop never
blocks on disk. Writes go through the kit's `Batcher` over `SqliteWorker.write_batch` (group commit): while one
transaction is being written, the next writes queue up and then go together in one transaction, each inside its
own SAVEPOINT (a failing write rolls back only itself); a lone write goes at once. A caller is answered only
after the COMMIT that includes its write returned. A write whose batch has started runs to COMMIT or ROLLBACK
on that thread even if its caller is cancelled: nothing is ever half-written.
Reads run on the same thread, between transactions.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from services.trading.model import Order, OrderStatus, PageCursor
from services.trading.store import ORDER_COLUMNS, order_from_row, order_to_row
from tradeguard.batching import DEFAULT_MAX_BATCH, Batcher
from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker

__all__ = ["MIGRATIONS", "SqliteOrderStore"]

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], object]

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
MIGRATIONS = (Migration(1, "orders and their status events", _V1),)

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
    def __init__(self, worker: SqliteWorker, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.worker = worker
        self._closed = False
        self.path = worker.path
        self.group: Batcher[Work, object] = Batcher(
            worker.write_batch, max_batch=max_batch, name="sqlite-orders-commit"
        )

    @classmethod
    async def open(cls, path: Path, *, max_batch: int = DEFAULT_MAX_BATCH) -> SqliteOrderStore:
        """Open (creating if needed) the store at `path`; `max_batch=1` makes every write its own transaction."""
        worker = await SqliteWorker.open(path, MIGRATIONS, name="sqlite-orders")
        return cls(worker, max_batch=max_batch)

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

    async def insert_if_absent(self, order: Order) -> tuple[Order, bool]:
        row = order_to_row(order)

        def work(conn: sqlite3.Connection) -> tuple[Order, bool]:
            inserted = conn.execute(_INSERT, row).fetchall()
            if inserted:
                conn.execute(_EVENT, (order.order_id, int(order.status), order.create_time_us))
                return order_from_row(inserted[0]), True
            existing = conn.execute(
                _SELECT_BY_CLIENT_ID, (order.account_id, order.client_order_id)
            ).fetchone()
            if existing is None:  # cannot happen inside BEGIN IMMEDIATE; never report a phantom order
                raise RuntimeError("insert conflicted but no existing order was found")
            return order_from_row(existing), False

        return await self._write(work)

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
            await self.worker.close()
