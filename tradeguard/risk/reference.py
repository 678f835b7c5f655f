"""Reference prices for the price collar and for a market order's notional.

`ReferencePrices` is the seam: `price(symbol)` answers the current reference price, or None when there is none
*or it is stale*. A source decides staleness itself (it knows when each price was set), so the engine treats
"stale" and "missing" alike: a check that needs a reference and gets None fails closed
(`RISK_NO_REFERENCE_PRICE`). `price` is called on every order: it must not block (no I/O; a source fed from
elsewhere keeps its latest prices in memory).

`PriceFeed` is the in-process source, the embedded default: whatever feeds it (a market-data task, an admin RPC
that sets prices over the API, a test) calls `set(symbol, price)` or `update({symbol: price, ...})`; a price
older than `max_age_us` (by the injected clock) counts as missing. Prices must be finite and positive. It holds
at most `max_symbols` symbols: setting a new symbol beyond that raises `ValueError` (a feed never grows without
bound); `remove(symbol)` drops one; `symbol in feed` says whether it has one, stale or not. Reads and writes are single dict operations, safe between threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Final, Protocol

__all__ = ["DEFAULT_MAX_AGE_US", "DEFAULT_MAX_SYMBOLS", "PriceFeed", "ReferencePrices"]

DEFAULT_MAX_AGE_US: Final = 5_000_000  # a reference price older than 5 s is no reference
DEFAULT_MAX_SYMBOLS: Final = 100_000


class ReferencePrices(Protocol):
    """The current reference price of a symbol; None if there is none or it is stale."""

    def price(self, symbol: str) -> Decimal | None: ...


class PriceFeed:
    """Reference prices kept in process, each stale after `max_age_us` (see the module)."""

    def __init__(
        self,
        clock_us: Callable[[], int],
        max_age_us: int = DEFAULT_MAX_AGE_US,
        max_symbols: int = DEFAULT_MAX_SYMBOLS,
    ) -> None:
        if max_age_us <= 0 or max_symbols <= 0:
            raise ValueError("max_age_us and max_symbols must be positive")
        self._clock_us = clock_us
        self.max_age_us = max_age_us
        self.max_symbols = max_symbols
        self._prices: dict[str, tuple[Decimal, int]] = {}

    def price(self, symbol: str) -> Decimal | None:
        entry = self._prices.get(symbol)
        if entry is None:
            return None
        price, at_us = entry
        if self._clock_us() - at_us > self.max_age_us:
            return None
        return price

    def set(self, symbol: str, price: Decimal, at_us: int | None = None) -> None:
        """The reference price of `symbol` from now (or from `at_us`, when the price was observed)."""
        if not isinstance(price, Decimal) or not price.is_finite() or price <= 0:
            raise ValueError(f"a reference price must be a finite positive Decimal, not {price!r}")
        if symbol not in self._prices and len(self._prices) >= self.max_symbols:
            raise ValueError(f"the feed holds {self.max_symbols} symbols already")
        self._prices[symbol] = (price, self._clock_us() if at_us is None else at_us)

    def update(self, prices: Mapping[str, Decimal]) -> None:
        """Several prices at once, all observed now (each validated as `set` does, in order)."""
        now = self._clock_us()
        for symbol, price in prices.items():
            self.set(symbol, price, now)

    def remove(self, symbol: str) -> None:
        self._prices.pop(symbol, None)

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, symbol: object) -> bool:
        """Whether the feed has a price for `symbol`, current or stale."""
        return symbol in self._prices
