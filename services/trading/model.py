"""The trading service's types: orders, their enums and limits, the page cursor, the canonical decimal form.

Imports nothing else of the service: the core, the stores and the servicer all build on these.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import IntEnum

__all__ = [
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
