"""The pre-trade risk checks' types (SEC 15c3-5, MiFID II RTS 6): the order as the checks see it, an account's
limits, the configuration (defaults, accounts, restricted symbols) and the rejection.

- `RiskOrder`: a new order, already validated by the trading service (positive quantity; a price for a limit
  order, none for a market order), quantity and price as `Decimal`. `Side` and `OrderType` carry the numbers of
  tradeguard.trading.v1 (so `Side(int(x))` converts any of the trading service's enums). `api_key_id` is
  carried for the audit record and for scopes to come (the kill switch); no check reads it yet.
- `AccountLimits`: one account's limits, every one optional (None: not checked). `price_collar` is a fraction
  (0.05 = 5 %, the file writes it in basis points); windows are µs. `restricted_symbols` already holds the file's
  global list as well as the account's own.
- `RiskConfig`: `defaults` for every account not in `accounts`; `limits_for(account_id)` is one dict lookup;
  `reference_prices`: the file's static prices, if any (a trading service seeds its reference source with them).
- `RiskRejected`: a `FailedPrecondition` whose `reason` is the check's code (`RiskCheck`) and whose metadata
  carries the values that failed as strings: `limit`, `actual`, plus `account_id` and `symbol` (and
  `reference_price` for a collar). The kit's error mapping puts the reason and the metadata in the ErrorInfo.

Imports nothing but the kit's errors: no grpc, no protobuf, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from tradeguard.errors import FailedPrecondition

__all__ = [
    "NO_LIMITS",
    "AccountLimits",
    "OrderType",
    "RiskCheck",
    "RiskConfig",
    "RiskOrder",
    "RiskRejected",
    "Side",
    "Throttle",
    "plain",
]


class Side(enum.IntEnum):
    UNSPECIFIED = 0
    BUY = 1
    SELL = 2


class OrderType(enum.IntEnum):
    UNSPECIFIED = 0
    LIMIT = 1
    MARKET = 2


class RiskCheck(enum.StrEnum):
    """A check's reason code (the ErrorInfo reason of its rejection)."""

    MAX_QUANTITY = "RISK_MAX_QUANTITY"
    MAX_NOTIONAL = "RISK_MAX_NOTIONAL"
    PRICE_COLLAR = "RISK_PRICE_COLLAR"
    NO_REFERENCE_PRICE = "RISK_NO_REFERENCE_PRICE"
    CREDIT_LIMIT = "RISK_CREDIT_LIMIT"
    RESTRICTED_SYMBOL = "RISK_RESTRICTED_SYMBOL"
    DUPLICATE_ORDER = "RISK_DUPLICATE_ORDER"
    MESSAGE_THROTTLE = "RISK_MESSAGE_THROTTLE"


@dataclass(frozen=True, slots=True)
class RiskOrder:
    """A new order as the risk checks see it. `price` is None for a market order."""

    account_id: str
    api_key_id: str
    client_order_id: str
    symbol: str
    side: Side
    type: OrderType
    quantity: Decimal
    price: Decimal | None


@dataclass(frozen=True, slots=True)
class Throttle:
    """At most `messages` orders pass in any `window_us` (a sliding window)."""

    messages: int
    window_us: int


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """One account's limits; None (or 0 for the duplicate window) turns a check off."""

    max_quantity: Decimal | None = None
    max_notional: Decimal | None = None
    price_collar: Decimal | None = None  # a fraction of the reference price, either side
    credit_limit: Decimal | None = None  # open orders' notional plus this order's
    restricted_symbols: frozenset[str] = frozenset()
    duplicate_window_us: int = 0
    throttle: Throttle | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether a market order needs a reference price (its notional is checked)."""
        return self.max_notional is not None or self.credit_limit is not None


NO_LIMITS: Final = AccountLimits()


@dataclass(frozen=True)
class RiskConfig:
    """The risk limits in force: `defaults` for every account not in `accounts` (whose limits are complete)."""

    defaults: AccountLimits = NO_LIMITS
    accounts: dict[str, AccountLimits] = field(default_factory=dict)
    restricted_symbols: frozenset[str] = frozenset()  # the file's global list (already in every account's)
    # static reference prices (development: the embedded default's market data); a live source takes precedence
    reference_prices: Mapping[str, Decimal] = field(default_factory=dict)
    source: str = ""
    sha256: str = ""

    max_duplicate_window_us: int = field(init=False)  # the longest of any account: older records can go

    def __post_init__(self) -> None:
        windows = [
            self.defaults.duplicate_window_us,
            *(a.duplicate_window_us for a in self.accounts.values()),
        ]
        object.__setattr__(self, "max_duplicate_window_us", max(windows))

    def limits_for(self, account_id: str) -> AccountLimits:
        return self.accounts.get(account_id, self.defaults)


def plain(value: Decimal | int) -> str:
    """A decimal as plain text: no exponent, no trailing fractional zeros (the form the trading API uses)."""
    if isinstance(value, int):
        return str(value)
    if value.is_zero():
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


_MESSAGES: Final = {
    RiskCheck.MAX_QUANTITY: "the order's quantity is over the account's maximum per order",
    RiskCheck.MAX_NOTIONAL: "the order's notional value is over the account's maximum per order",
    RiskCheck.PRICE_COLLAR: "the order's price is outside the collar around the reference price",
    RiskCheck.NO_REFERENCE_PRICE: "no current reference price for the symbol: the order cannot be checked",
    RiskCheck.CREDIT_LIMIT: "the account's open orders with this one would exceed its credit limit",
    RiskCheck.RESTRICTED_SYMBOL: "the symbol is restricted",
    RiskCheck.DUPLICATE_ORDER: "the same order was accepted within the duplicate window",
    RiskCheck.MESSAGE_THROTTLE: "too many orders from the account in the throttle window",
}


class RiskRejected(FailedPrecondition):
    """An order refused by a risk check: `check` (the reason), `limit` and `actual` (strings; see the module)."""

    def __init__(
        self,
        check: RiskCheck,
        order: RiskOrder,
        limit: str,
        actual: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        metadata = {"limit": limit, "actual": actual, "account_id": order.account_id, "symbol": order.symbol}
        if extra:
            metadata.update(extra)
        super().__init__(
            f"{_MESSAGES[check]} (limit {limit}, actual {actual})", reason=check.value, metadata=metadata
        )
        self.check = check
        self.limit = limit
        self.actual = actual
