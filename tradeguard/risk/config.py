"""The risk file (YAML, `version: 1`): per-account pre-trade limits, parsed strictly into a `RiskConfig`, or refused
with an error that names the line and the field: `RiskFileError("risk.yaml:7: accounts.acct-1.max_quantity: 'x'
is not a decimal number")`. `RiskFile` keeps the file in force, hot-reloaded (a bad edit keeps the last good
limits and says why; tradeguard/reload.py).

The format (tradeguard/risk/risk.yaml is the packaged, commented example):

    version: 1                          # required, 1
    restricted_symbols: [ABC, XYZ/USD]  # optional: restricted for every account
    defaults:                           # required (may be {}): every account not listed below
      max_quantity: 100000              # per order (a decimal: 100000, 0.5, "1e6")
      max_notional: 5000000             # per order: quantity x price (x the reference price for a market order)
      price_collar_bps: 500             # 1..10000: the price within reference x (1 +- 5 %)
      credit_limit: 20000000            # open orders' notional plus this order's
      duplicate_window: 1s              # <n>ms|s|m|h or seconds; 0 = off
      throttle: {messages: 100, window: 1s}  # at most 100 orders in any 1 s (1..MAX_THROTTLE_MESSAGES)
      restricted_symbols: [FOO]         # the defaults' own list
    accounts:                           # optional; account id -> the same keys as defaults
      acct-1: {max_quantity: 500, credit_limit: null}
    reference_prices:                   # optional: static reference prices, symbol -> a decimal > 0
      BTC-USD: 64000                    # (development market data for the embedded default; never stale)

Every key of `defaults` and of an account is optional; an absent key is not checked (in `defaults`) or takes
the defaults' value (in an account); `null` turns a check off (in an account: lifts the default). An account's
`restricted_symbols` replaces the defaults' list; the top-level list applies to every account whatever it says.
Decimals are read exactly as written (never through a binary float) and must be within 0..MAX_DECIMAL; a limit
of 0 refuses every order it applies to.

Refused: unknown and duplicate keys, account ids and symbols not in the trading API's forms (ACCOUNT_PATTERN,
SYMBOL_PATTERN), duplicate symbols in a list, a version other than 1, and everything the kit's safe YAML
reader refuses (tags, aliases, more than MAX_DEPTH levels, more than MAX_BYTES). The config's `sha256` is of the
text's UTF-8 bytes; `source` (a path, usually) prefixes every error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from yaml.nodes import Node, ScalarNode

from tradeguard.reload import WatchedFile
from tradeguard.risk.model import AccountLimits, RiskConfig, Throttle
from tradeguard.yamlfile import NULL, Reader, YamlError, check_size, compose, key_path, short

__all__ = [
    "ACCOUNT_PATTERN",
    "MAX_DECIMAL",
    "MAX_DUPLICATE_WINDOW_US",
    "MAX_THROTTLE_MESSAGES",
    "MAX_THROTTLE_WINDOW_US",
    "SYMBOL_PATTERN",
    "RiskFile",
    "RiskFileError",
    "parse_risk",
]

ACCOUNT_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SYMBOL_PATTERN: Final = re.compile(r"[A-Z0-9]{1,12}(?:[-/][A-Z0-9]{1,12})?")
MAX_DECIMAL: Final = Decimal("1e24")
MAX_COLLAR_BPS: Final = 10_000
MAX_DUPLICATE_WINDOW_US: Final = 3_600_000_000  # 1 h
MAX_THROTTLE_MESSAGES: Final = 10_000
MAX_THROTTLE_WINDOW_US: Final = 3_600_000_000  # 1 h

_LIMIT_KEYS: Final = (
    "max_quantity",
    "max_notional",
    "price_collar_bps",
    "credit_limit",
    "duplicate_window",
    "throttle",
    "restricted_symbols",
)
_BPS: Final = Decimal(10_000)


class RiskFileError(YamlError):
    """A risk file refused: "<source>:<line>: <path>: <problem>"."""


def parse_risk(text: str, source: str) -> RiskConfig:
    """The validated config of a risk file's text; `RiskFileError` naming the line and field otherwise."""
    data = check_size(text, source, RiskFileError)
    root = compose(text, source, RiskFileError)
    defaults, accounts, restricted, prices = _Parser(source).config(root)
    return RiskConfig(
        defaults=defaults,
        accounts=accounts,
        restricted_symbols=restricted,
        reference_prices=prices,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
    )


class _Parser(Reader):
    def __init__(self, source: str) -> None:
        super().__init__(source, RiskFileError)

    def config(
        self, root: Node | None
    ) -> tuple[AccountLimits, dict[str, AccountLimits], frozenset[str], dict[str, Decimal]]:
        if root is None:
            self.fail(None, "", "the file is empty")
        top = self.fields(
            root,
            "",
            ("version", "restricted_symbols", "defaults", "accounts", "reference_prices"),
            ("version", "defaults"),
        )
        version = top["version"]
        if self.integer(version, "version", 0, 1_000_000) != 1:
            self.fail(version, "version", f"{version.value} is not a version this file reader reads (1)")
        restricted = (
            self.symbols(top["restricted_symbols"], "restricted_symbols")
            if "restricted_symbols" in top
            else frozenset()
        )
        defaults = self.limits(top["defaults"], "defaults", AccountLimits())
        accounts: dict[str, AccountLimits] = {}
        if "accounts" in top:
            for account, key_node, value in self.mapping(top["accounts"], "accounts"):
                path = key_path("accounts", account)
                if not ACCOUNT_PATTERN.fullmatch(account):
                    self.fail(key_node, path, "not a valid account id")
                accounts[account] = self.with_global(self.limits(value, path, defaults), restricted)
        prices: dict[str, Decimal] = {}
        if "reference_prices" in top:
            for symbol, key_node, value in self.mapping(top["reference_prices"], "reference_prices"):
                path = key_path("reference_prices", symbol)
                if not SYMBOL_PATTERN.fullmatch(symbol):
                    self.fail(key_node, path, "not a valid symbol")
                price = self.decimal(value, path, Decimal(0), MAX_DECIMAL)
                if price <= 0:
                    self.fail(value, path, "a reference price must be greater than 0")
                prices[symbol] = price
        return self.with_global(defaults, restricted), accounts, restricted, prices

    @staticmethod
    def with_global(limits: AccountLimits, restricted: frozenset[str]) -> AccountLimits:
        if not restricted:
            return limits
        return dataclasses.replace(limits, restricted_symbols=limits.restricted_symbols | restricted)

    def limits(self, node: Node, path: str, base: AccountLimits) -> AccountLimits:
        items = self.fields(node, path, _LIMIT_KEYS, ())
        changes: dict[str, Any] = {}
        for key, value in items.items():
            field_path = f"{path}.{key}"
            null = isinstance(value, ScalarNode) and value.tag == NULL
            if key == "restricted_symbols":
                changes[key] = self.symbols(value, field_path)
            elif key == "duplicate_window":
                changes["duplicate_window_us"] = (
                    0 if null else self.duration(value, field_path, 0, MAX_DUPLICATE_WINDOW_US)
                )
            elif null:
                changes["price_collar" if key == "price_collar_bps" else key] = None
            elif key == "price_collar_bps":
                changes["price_collar"] = Decimal(self.integer(value, field_path, 1, MAX_COLLAR_BPS)) / _BPS
            elif key == "throttle":
                changes[key] = self.throttle(value, field_path)
            else:
                changes[key] = self.decimal(value, field_path, Decimal(0), MAX_DECIMAL)
        return dataclasses.replace(base, **changes)

    def throttle(self, node: Node, path: str) -> Throttle:
        items = self.fields(node, path, ("messages", "window"), ("messages", "window"))
        return Throttle(
            messages=self.integer(items["messages"], f"{path}.messages", 1, MAX_THROTTLE_MESSAGES),
            window_us=self.duration(items["window"], f"{path}.window", 1_000, MAX_THROTTLE_WINDOW_US),
        )

    def symbols(self, node: Node, path: str) -> frozenset[str]:
        symbols: set[str] = set()
        for index, item in enumerate(self.sequence(node, path)):
            item_path = f"{path}[{index}]"
            symbol = self.name(item, item_path, SYMBOL_PATTERN, "symbol")
            if symbol in symbols:
                self.fail(item, item_path, f"{short(repr(symbol))} is listed twice")
            symbols.add(symbol)
        return frozenset(symbols)


def _describe(config: RiskConfig) -> Mapping[str, Any]:
    return {"accounts": len(config.accounts), "restricted_symbols": len(config.restricted_symbols)}


class RiskFile(WatchedFile[RiskConfig]):
    """The risk limits in force from `path`, hot-reloaded: `current` for `RiskEngine(lambda: f.current, ...)`,
    `check()` / `watch(interval_s)` to follow the file, `last_error` when an edit was refused. The first load
    raises `RiskFileError` (a service refuses to start without valid limits). Logs `risk.limits_loaded`,
    `risk.limits_rejected`, `risk.limits_check_failed`."""

    def __init__(self, path: Path, clock_us: Callable[[], int]) -> None:
        super().__init__(
            path,
            parse_risk,
            clock_us,
            name="risk.limits",
            what="risk limits",
            error=RiskFileError,
            describe=_describe,
        )
