"""The trading service's types: orders, their enums and limits, the page cursor, the canonical decimal form.

Imports nothing else of the service: the core, the stores and the servicer all build on these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum

__all__ = [
    "Admission",
    "Controls",
    "KillScope",
    "KillSwitch",
    "NewOrder",
    "Order",
    "OrderLimits",
    "OrderStatus",
    "OrderType",
    "PageCursor",
    "Side",
    "TimeInForce",
    "format_decimal",
]


class Side(IntEnum):
    UNSPECIFIED = 0
    BUY = 1
    SELL = 2


class OrderType(IntEnum):
    UNSPECIFIED = 0
    LIMIT = 1
    MARKET = 2


class TimeInForce(IntEnum):
    UNSPECIFIED = 0
    GTC = 1
    IOC = 2
    FOK = 3


class OrderStatus(IntEnum):
    UNSPECIFIED = 0
    OPEN = 1
    CANCELED = 2
    FILLED = 3
    REJECTED = 4


@dataclass(frozen=True)
class OrderLimits:
    """Per-order price and size checks (SEC 15c3-5, MiFID II RTS 6 max order value and volume)."""

    max_decimals: int = 8
    max_quantity: Decimal = Decimal("1e12")
    max_price: Decimal = Decimal("1e12")
    max_notional: Decimal = Decimal("1e15")


@dataclass(frozen=True)
class NewOrder:
    """A validated, canonical order request."""

    account_id: str
    client_order_id: str
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    quantity: Decimal
    price: Decimal | None


@dataclass(frozen=True)
class Order:
    order_id: str
    account_id: str
    client_order_id: str
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    quantity: Decimal
    price: Decimal | None
    status: OrderStatus
    create_time_us: int
    update_time_us: int

    def same_request(self, new: NewOrder) -> bool:
        """Whether `new` repeats the request that placed this order (decimals compared by value)."""
        return (
            self.account_id == new.account_id
            and self.client_order_id == new.client_order_id
            and self.symbol == new.symbol
            and self.side == new.side
            and self.type == new.type
            and self.time_in_force == new.time_in_force
            and self.quantity == new.quantity
            and self.price == new.price
        )


@dataclass(frozen=True)
class PageCursor:
    """Position after the last order of a page: orders strictly older than this come next.

    Bound to the account it was issued for, so a token never pages through another account.
    """

    account_id: str
    create_time_us: int
    order_id: str


def format_decimal(d: Decimal) -> str:
    """The canonical plain string of a finite decimal: no exponent, no trailing fractional zeros."""
    if not d.is_finite():
        raise ValueError(f"not a finite decimal: {d}")
    if d.is_zero():
        return "0"
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# --- pre-trade controls: the kill switch, risk overrides, reference prices ---------------------------------


class KillScope(IntEnum):
    """What a kill switch covers (the numbers of tradeguard.trading.v1.KillSwitchScope)."""

    UNSPECIFIED = 0
    GLOBAL = 1  # every order; value ""
    ACCOUNT = 2  # value: the account id
    API_KEY = 3  # value: the API key id that signed the order
    SYMBOL = 4  # value: the symbol


@dataclass(frozen=True)
class KillSwitch:
    """A kill switch: engaged while `released_at_us` is None; a released one stays as history."""

    switch_id: str
    scope: KillScope
    value: str
    reason: str
    engaged_by: str
    engaged_at_us: int
    released_by: str = ""
    released_at_us: int | None = None
    release_reason: str = ""

    @property
    def key(self) -> tuple[KillScope, str]:
        return self.scope, self.value


@dataclass(frozen=True)
class Admission:
    """What the store does inside an order's insert transaction, before it commits (see OrderStore).

    `notional` (None: unknown, a market order with no reference price needed) and `api_key_id` ("" for a token
    call) are stored with the order. `admit(switches, open_notional)` is called with the engaged switches that
    cover the order (scope, value) and the sum of the notional of the account's OPEN orders, both read under
    the store's lock; it raises to refuse the order (nothing is inserted). It may be called twice for one
    insert (a group commit retried with savepoints): it must have no side effects."""

    notional: Decimal | None
    api_key_id: str
    admit: Callable[[list[tuple[KillScope, str]], Decimal], None]


@dataclass(frozen=True)
class Controls:
    """Everything the store holds that every instance follows: read whole on each change of `version`."""

    version: int
    switches: list[KillSwitch] = field(default_factory=list)  # engaged ones only
    overrides: Mapping[str, str] = field(default_factory=dict)  # account id -> risk limits override, as JSON
    prices: Mapping[str, tuple[Decimal, int]] = field(default_factory=dict)  # symbol -> (price, set at µs)
