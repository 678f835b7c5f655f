"""Where orders live: the `OrderStore` protocol, implemented by SQLite and PostgreSQL backends.

Besides the orders, the store holds the pre-trade controls every instance of the service follows: kill switches
(engaged and, as history, released), per-account risk-limit overrides and the latest reference price per symbol,
plus a control `version` bumped by every change of them. Instances poll `control_version()` and re-read
`controls()` when it moved (services/trading/controls.py).

Admission and the kill switch (why the credit limit and a kill switch hold with several instances on one
database): an insert with an `Admission` takes the store's control lock, inserts the order (a key that exists:
that order is returned, never admitted again), reads the engaged switches that cover it and the account's open
notional (kept per account, added to by an admitted insert and taken from when an order leaves OPEN: one row
read, however many orders are open) and calls `admit`, whose refusal rolls the insert back: all in one
transaction (or savepoint, in a group commit); engaging a
switch takes the same lock, inserts the switch, cancels every OPEN order in scope and bumps the version, in one
transaction. So an order is either inserted before the switch (and cancelled by it) or checked after it (and
refused), and two orders of an account never both pass on the same credit headroom. SQLite: BEGIN IMMEDIATE is
that lock (one writer per database file, whatever the process). PostgreSQL: the lock is the `control` row taken
FOR UPDATE, in its own statement, so that the reads after it (READ COMMITTED: a new snapshot per statement) see
everything the previous holder committed. One lock for all accounts, not one per account: a batch of inserts
(group commit) takes locks one after another, and per-account locks taken in different orders by two instances'
batches could deadlock; a single lock cannot. Its cost: the write batches of two instances alternate (each
instance still groups its writes), as with SQLite's single writer.
"""

from __future__ import annotations

import builtins
from decimal import Decimal
from typing import Protocol

from services.trading.model import (
    Admission,
    Controls,
    KillScope,
    KillSwitch,
    Order,
    OrderStatus,
    OrderType,
    PageCursor,
    Side,
    TimeInForce,
    format_decimal,
)

__all__ = [
    "MAX_RELEASED_LISTED",
    "ORDER_COLUMNS",
    "SCHEMA_VERSION",
    "SWITCH_COLUMNS",
    "OrderStore",
    "engaged_row",
    "order_from_row",
    "order_to_row",
    "switch_from_row",
    "to_decimal",
]

# The version both backends' MIGRATIONS lead to (store_sqlite.py, store_postgres.py; see
# tradeguard.storage.migrations): a change of the tables is a new migration in each backend and a bump here.
SCHEMA_VERSION = 3


class OrderStore(Protocol):
    async def insert_if_absent(self, order: Order, admission: Admission | None = None) -> tuple[Order, bool]:
        """Insert `order` unless (account_id, client_order_id) exists; return (stored order, created).

        Atomic: of many concurrent inserts with one key, exactly one creates and all see that order. With an
        `admission`, when the key is new: under the control lock, `admission.admit(covering switches, open
        notional)` is called in the insert's transaction (its exception is raised and nothing is stored), and the
        order is stored with `admission.notional` and `admission.api_key_id` (see the module).
        """
        ...

    async def find(self, account_id: str, client_order_id: str) -> Order | None:
        """The account's order placed with `client_order_id`, or None (the idempotency lookup)."""
        ...

    async def engage(self, switch: KillSwitch) -> tuple[KillSwitch, int]:
        """Engage `switch` (or find the one already engaged for its scope and value) and cancel every OPEN order
        in its scope, in one transaction under the control lock; bumps the control version. Returns the switch in
        force and how many orders this call cancelled."""
        ...

    async def release(
        self, scope: KillScope, value: str, released_by: str, reason: str, now_us: int
    ) -> KillSwitch | None:
        """Release the engaged switch of (scope, value), kept as history; None if none is engaged. Bumps the
        control version."""
        ...

    async def kill_switches(self, include_released: bool = False) -> builtins.list[KillSwitch]:
        """The engaged switches (oldest first), then, if asked, the released ones (most recent first, 1000)."""
        ...

    async def set_override(self, account_id: str, limits_json: str | None, by: str, now_us: int) -> None:
        """Set (None: remove) the account's risk limits override; bumps the control version."""
        ...

    async def set_reference_price(self, symbol: str, price: Decimal, at_us: int) -> None:
        """Upsert the symbol's latest reference price; bumps the control version."""
        ...

    async def control_version(self) -> int:
        """The control version (cheap: polled every ~200 ms by each instance)."""
        ...

    async def controls(self) -> Controls:
        """The engaged switches, the overrides and the reference prices, with the version they were read at."""
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


def switch_from_row(row: tuple[object, ...]) -> KillSwitch:
    """A `KillSwitch` from a row of SWITCH_COLUMNS."""
    switch_id, scope, value, reason, engaged_by, engaged_at, released_by, released_at, release_reason = row
    assert isinstance(switch_id, str) and isinstance(scope, int) and isinstance(value, str)
    assert isinstance(reason, str) and isinstance(engaged_by, str) and isinstance(engaged_at, int)
    assert isinstance(released_by, str) and isinstance(release_reason, str)
    assert released_at is None or isinstance(released_at, int)
    return KillSwitch(
        switch_id=switch_id,
        scope=KillScope(scope),
        value=value,
        reason=reason,
        engaged_by=engaged_by,
        engaged_at_us=engaged_at,
        released_by=released_by,
        released_at_us=released_at,
        release_reason=release_reason,
    )


def engaged_row(switch: KillSwitch, now_us: int) -> tuple[object, ...]:
    """The SWITCH_COLUMNS row of `switch` engaged at `now_us` (not released)."""
    return (
        switch.switch_id,
        int(switch.scope),
        switch.value,
        switch.reason,
        switch.engaged_by,
        now_us,
        "",
        None,
        "",
    )


SWITCH_COLUMNS = (
    "switch_id",
    "scope",
    "value",
    "reason",
    "engaged_by",
    "engaged_at_us",
    "released_by",
    "released_at_us",
    "release_reason",
)
MAX_RELEASED_LISTED = 1000


def to_decimal(value: object) -> Decimal:
    """A decimal column's value (NUMERIC or TEXT) as a canonical `Decimal`."""
    return _to_decimal(value)


def _to_decimal(value: object) -> Decimal:
    if isinstance(value, Decimal):
        return Decimal(format_decimal(value))
    if isinstance(value, str):
        return Decimal(format_decimal(Decimal(value)))
    raise TypeError(f"unexpected decimal column value {value!r}")
