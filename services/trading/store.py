"""Where orders live: the `OrderStore` protocol, implemented by SQLite and PostgreSQL backends."""

from __future__ import annotations

import builtins
from decimal import Decimal
from typing import Protocol

from services.trading.model import (
    Order,
    OrderStatus,
    OrderType,
    PageCursor,
    Side,
    TimeInForce,
    format_decimal,
)

__all__ = ["ORDER_COLUMNS", "SCHEMA_VERSION", "OrderStore", "order_from_row", "order_to_row"]

# The version both backends' MIGRATIONS lead to (store_sqlite.py, store_postgres.py; see
# tradeguard.storage.migrations): a change of the tables is a new migration in each backend and a bump here.
SCHEMA_VERSION = 1


class OrderStore(Protocol):
    async def insert_if_absent(self, order: Order) -> tuple[Order, bool]:
        """Insert `order` unless (account_id, client_order_id) exists; return (stored order, created).

        Atomic: of many concurrent inserts with one key, exactly one creates and all see that order.
        """
        ...

    async def get(self, account_id: str, order_id: str) -> Order | None:
        """The order, or None when it does not exist or belongs to another account."""
        ...

    async def transition(
        self, account_id: str, order_id: str, from_status: OrderStatus, to_status: OrderStatus, now_us: int
    ) -> Order | None:
        """Move the order from `from_status` to `to_status`; None if it is missing or not in `from_status`."""
        ...

    async def list(self, account_id: str, limit: int, before: PageCursor | None) -> builtins.list[Order]:
        """Up to `limit` orders of the account, newest first by (create_time_us, order_id), after `before`."""
        ...

    async def close(self) -> None: ...


ORDER_COLUMNS = (
    "order_id",
    "account_id",
    "client_order_id",
    "symbol",
    "side",
    "type",
    "time_in_force",
    "quantity",
    "price",
    "status",
    "create_time_us",
    "update_time_us",
)


def order_from_row(row: tuple[object, ...]) -> Order:
    """An `Order` from a row of ORDER_COLUMNS; decimals come back canonical whatever the column type."""
    (
        order_id,
        account_id,
        client_order_id,
        symbol,
        side,
        type_,
        time_in_force,
        quantity,
        price,
        status,
        create_time_us,
        update_time_us,
    ) = row
    assert isinstance(order_id, str) and isinstance(account_id, str)
    assert isinstance(client_order_id, str) and isinstance(symbol, str)
    assert isinstance(side, int) and isinstance(type_, int) and isinstance(time_in_force, int)
    assert isinstance(status, int) and isinstance(create_time_us, int) and isinstance(update_time_us, int)
    return Order(
        order_id=order_id,
        account_id=account_id,
        client_order_id=client_order_id,
        symbol=symbol,
        side=Side(side),
        type=OrderType(type_),
        time_in_force=TimeInForce(time_in_force),
        quantity=_to_decimal(quantity),
        price=None if price is None else _to_decimal(price),
        status=OrderStatus(status),
        create_time_us=create_time_us,
        update_time_us=update_time_us,
    )


def order_to_row(order: Order) -> tuple[str, str, str, str, int, int, int, str, str | None, int, int, int]:
    """ORDER_COLUMNS values of an order, decimals as canonical strings."""
    return (
        order.order_id,
        order.account_id,
        order.client_order_id,
        order.symbol,
        int(order.side),
        int(order.type),
        int(order.time_in_force),
        format_decimal(order.quantity),
        None if order.price is None else format_decimal(order.price),
        int(order.status),
        order.create_time_us,
        order.update_time_us,
    )


def _to_decimal(value: object) -> Decimal:
    if isinstance(value, Decimal):
        return Decimal(format_decimal(value))
    if isinstance(value, str):
        return Decimal(format_decimal(Decimal(value)))
    raise TypeError(f"unexpected decimal column value {value!r}")
