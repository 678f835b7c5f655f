"""One instance's pre-trade controls: the kill switch, the risk engine with its limits and reference prices, and
how they follow the store so that every instance on one database acts alike.

`TradingControls(store, risk_config, clock_us=..., risk=True)`:
- `kill_check(account, api_key_id, symbol)` (in memory, a few set lookups): KILL_SWITCH_ENGAGED if an engaged
  switch covers the order. The store's insert transaction checks again, under its lock (`admit`): the store is
  authoritative, the memory is the fast path.
- `engine`: the tradeguard.risk engine (None with the risk checks off), reading `config()`: the risk file's
  limits with the store's per-account overrides on top (services/trading/limits.py), and `prices`: the live
  reference prices (SetReferencePrice, kept in the store, each stale after `price_max_age_us`; 0: never) over
  the risk file's static `reference_prices` (never stale; used only for a symbol with no live price).
- `refresh()` reads the store's control version and, when it moved, the whole `Controls` (engaged switches,
  overrides, prices); `follow(interval_s)` does so forever (a background task: ~200 ms, so a switch engaged on
  one instance reaches the others well within a second; a failing read is logged and retried, the last state
  kept). An instance's own changes apply to it at once.
- the admin actions (`engage`, `release`, `switches`, `set_price`, `effective_limits`, `set_limits`) write
  through the store (shared by every instance) and refresh.

Pure: no grpc, no protobuf, no I/O of its own (the store is a `typing.Protocol`). One event loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from services.trading.errors import (
    InvalidArgument,
    fresh_mfa_required,
    kill_switch_engaged,
    kill_switch_not_engaged,
)
from services.trading.limits import apply_override, override_from_json, override_to_json, validate_override
from services.trading.model import Controls, KillScope, KillSwitch
from tradeguard.observability.logging import get_logger
from tradeguard.risk.checks import RiskEngine
from tradeguard.risk.config import ACCOUNT_PATTERN, SYMBOL_PATTERN
from tradeguard.risk.model import AccountLimits, RiskConfig
from tradeguard.risk.reference import PriceFeed

if TYPE_CHECKING:
    from services.trading.store import OrderStore
    from tradeguard.principal import Principal

__all__ = ["NEVER_STALE_US", "ReferenceBook", "TradingControls", "validate_scope"]

_log = get_logger("tradeguard.trading.controls")

NEVER_STALE_US: Final = 2**62
MAX_REASON_CHARS: Final = 500
RELEASE_MFA_MAX_AGE_US: Final = 300_000_000  # releasing a switch: a second factor at most 5 minutes ago
_API_KEY_ID_MAX: Final = 128


class ReferenceBook:
    """Reference prices: a symbol's live price (stale after its maximum age: None, fail closed) if it ever had one,
    else the risk file's static price (see the module)."""

    def __init__(self, live: PriceFeed, static: Callable[[], Mapping[str, Decimal]]) -> None:
        self.live = live
        self._static = static

    def price(self, symbol: str) -> Decimal | None:
        if symbol in self.live:
            return self.live.price(symbol)
        return self._static().get(symbol)


def validate_scope(scope: int, value: str) -> KillScope:
    """The scope, with its value checked (GLOBAL: empty; ACCOUNT and SYMBOL: the API's forms; API_KEY: a key id)."""
    if scope not in (KillScope.GLOBAL, KillScope.ACCOUNT, KillScope.API_KEY, KillScope.SYMBOL):
        raise InvalidArgument.field("scope", "must be GLOBAL, ACCOUNT, API_KEY or SYMBOL")
    kind = KillScope(scope)
    if kind is KillScope.GLOBAL:
        if value:
            raise InvalidArgument.field("value", "must be empty for the GLOBAL scope")
    elif kind is KillScope.ACCOUNT and not ACCOUNT_PATTERN.fullmatch(value):
        raise InvalidArgument.field("value", "must be an account id")
    elif kind is KillScope.SYMBOL and not SYMBOL_PATTERN.fullmatch(value):
        raise InvalidArgument.field("value", "must be a symbol")
    elif kind is KillScope.API_KEY and (
        not value or len(value) > _API_KEY_ID_MAX or not value.isprintable() or " " in value
    ):
        raise InvalidArgument.field("value", "must be an API key id")
    return kind


def _reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise InvalidArgument.field("reason", "required")
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise InvalidArgument.field("reason", f"must be at most {MAX_REASON_CHARS} printable characters")
    return reason


def new_switch_id() -> str:
    return "ks_" + secrets.token_hex(10)


class TradingControls:
    def __init__(
        self,
        store: OrderStore,
        risk_config: Callable[[], RiskConfig],
        *,
        clock_us: Callable[[], int],
        risk: bool = True,
        price_max_age_us: int = 60_000_000,
        new_switch_id: Callable[[], str] = new_switch_id,
    ) -> None:
        self._store = store
        self._file = risk_config
        self._clock_us = clock_us
        self._new_switch_id = new_switch_id
        self.version = -1  # nothing read yet
        self.switches: set[tuple[KillScope, str]] = set()
        self.overrides: dict[str, dict[str, Any]] = {}
        self._merged: tuple[RiskConfig, int, RiskConfig] | None = None  # (file config, overrides gen, merged)
        self._overrides_gen = 0
        self.prices = ReferenceBook(
            PriceFeed(clock_us, max_age_us=price_max_age_us or NEVER_STALE_US),
            lambda: self._file().reference_prices,
        )
        self.engine = RiskEngine(self.config, self.prices, clock_us) if risk else None

    # --- the limits in force ------------------------------------------------------------------------------

    def config(self) -> RiskConfig:
        """The risk file's limits with the overrides on top (rebuilt only when either changed)."""
        file = self._file()
        merged = self._merged
        if merged is not None and merged[0] is file and merged[1] == self._overrides_gen:
            return merged[2]
        if not self.overrides:
            config = file
        else:
            accounts = dict(file.accounts)
            for account, override in self.overrides.items():
                accounts[account] = apply_override(
                    file.limits_for(account), override, file.restricted_symbols
                )
            config = RiskConfig(
                defaults=file.defaults,
                accounts=accounts,
                restricted_symbols=file.restricted_symbols,
                reference_prices=file.reference_prices,
                source=file.source,
                sha256=file.sha256,
            )
        self._merged = (file, self._overrides_gen, config)
        return config

    def effective_limits(self, account_id: str) -> tuple[AccountLimits, str, dict[str, Any] | None]:
        """The account's limits in force, where they come from, and its override (if any)."""
        if not ACCOUNT_PATTERN.fullmatch(account_id):
            raise InvalidArgument.field("account_id", "must be an account id")
        file = self._file()
        source = "file:account" if account_id in file.accounts else "file:defaults"
        override = self.overrides.get(account_id)
        if override is not None:
            source += "+override"
        return self.config().limits_for(account_id), source, override

    # --- the kill switch ----------------------------------------------------------------------------------

    def kill_check(self, account_id: str, api_key_id: str, symbol: str) -> None:
        """KILL_SWITCH_ENGAGED if an engaged switch (as last read) covers the order."""
        switches = self.switches
        if not switches:
            return
        for key in (
            (KillScope.GLOBAL, ""),
            (KillScope.ACCOUNT, account_id),
            (KillScope.SYMBOL, symbol),
            (KillScope.API_KEY, api_key_id),
        ):
            if key in switches:
                raise kill_switch_engaged(key[0].name, key[1])

    @staticmethod
    def refuse_if_covered(covering: list[tuple[KillScope, str]]) -> None:
        """The store's re-check, under its lock (the most general scope first)."""
        if covering:
            scope, value = min(covering)
            raise kill_switch_engaged(scope.name, value)

    async def engage(self, scope: int, value: str, reason: str, by: str) -> tuple[KillSwitch, int]:
        kind = validate_scope(scope, value)
        switch = KillSwitch(
            switch_id=self._new_switch_id(),
            scope=kind,
            value=value,
            reason=_reason(reason),
            engaged_by=by,
            engaged_at_us=self._clock_us(),
        )
        self.switches.add(switch.key)  # refuse here at once, even before the transaction commits
        try:
            engaged, cancelled = await self._store.engage(switch)
        except BaseException:
            self.version = -1  # read the store's state again, whatever it is
            await self._refresh_quietly()
            raise
        await self._refresh_quietly()
        _log.warning(
            "kill_switch_engaged",
            scope=kind.name,
            value=value,
            by=by,
            cancelled=cancelled,
            switch=engaged.switch_id,
        )
        return engaged, cancelled

    async def release(self, scope: int, value: str, reason: str, by: Principal) -> KillSwitch:
        """Release the switch of (scope, value): `by` must have passed a second factor in a login at most 5
        minutes ago (a refreshed token never counts), else PERMISSION_DENIED FRESH_MFA_REQUIRED."""
        if not by.fresh_mfa(self._clock_us(), RELEASE_MFA_MAX_AGE_US):
            raise fresh_mfa_required(RELEASE_MFA_MAX_AGE_US // 1_000_000)
        kind = validate_scope(scope, value)
        released = await self._store.release(kind, value, by.user_id, _reason(reason), self._clock_us())
        if released is None:
            raise kill_switch_not_engaged(kind.name, value)
        await self._refresh_quietly()
        _log.warning(
            "kill_switch_released", scope=kind.name, value=value, by=by.user_id, switch=released.switch_id
        )
        return released

    async def switches_listed(self, include_released: bool) -> list[KillSwitch]:
        return await self._store.kill_switches(include_released)

    # --- prices and overrides -----------------------------------------------------------------------------

    async def set_price(self, symbol: str, price: Decimal) -> None:
        if not SYMBOL_PATTERN.fullmatch(symbol):
            raise InvalidArgument.field("symbol", "must be a symbol")
        if not price.is_finite() or price <= 0:
            raise InvalidArgument.field("price", "must be greater than zero")
        now = self._clock_us()
        await self._store.set_reference_price(symbol, price, now)
        try:
            self.prices.live.set(symbol, price, now)
        except ValueError as problem:  # the feed is full: the stored price reaches the other instances anyway
            _log.error("reference_price_unusable", symbol=symbol, error=str(problem))

    async def set_limits(self, account_id: str, fields: Mapping[str, Any] | None, by: str) -> None:
        """Set the account's override (`fields`: see services/trading/limits.py) or, with None, clear it."""
        if not ACCOUNT_PATTERN.fullmatch(account_id):
            raise InvalidArgument.field("account_id", "must be an account id")
        override = None if fields is None else validate_override(fields)
        await self._store.set_override(
            account_id, None if override is None else override_to_json(override), by, self._clock_us()
        )
        await self._refresh_quietly()

    # --- following the store ------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Re-read the controls if the store's version moved; True if it did."""
        version = await self._store.control_version()
        if version == self.version:
            return False
        self.apply(await self._store.controls())
        return True

    def apply(self, controls: Controls) -> None:
        """Make `controls` the state in force, unless a newer state was applied meanwhile (two reads racing)."""
        if controls.version < self.version:
            return
        self.switches = {switch.key for switch in controls.switches}
        overrides: dict[str, dict[str, Any]] = {}
        for account, text in controls.overrides.items():
            try:
                overrides[account] = override_from_json(text)
            except (ValueError, InvalidArgument) as problem:  # never stop following for one bad row
                _log.error("risk_override_unreadable", account=account, error=str(problem))
        if overrides != self.overrides:
            self.overrides = overrides
            self._overrides_gen += 1
        live = self.prices.live
        for symbol, (price, at_us) in controls.prices.items():
            try:
                live.set(symbol, price, at_us)
            except ValueError as problem:
                _log.error("reference_price_unusable", symbol=symbol, error=str(problem))
        self.version = controls.version

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as problem:  # the change is stored; the poll picks it up
            _log.error("controls_refresh_failed", error=repr(problem))

    async def follow(self, interval_s: float) -> None:
        """`refresh()` every `interval_s`, forever (cancel the task to stop)."""
        failing = False
        while True:
            try:
                await self.refresh()
                if failing:
                    _log.info("controls_refresh_recovered")
                failing = False
            except Exception as problem:
                if not failing:
                    _log.error("controls_refresh_failed", error=repr(problem))
                failing = True
            await asyncio.sleep(interval_s)
