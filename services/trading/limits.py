"""Per-account risk-limit overrides (SetRiskLimits): validated, stored as JSON, applied on top of the risk file.

An override is a dict of the API's `RiskLimits` fields that were set: `max_quantity`, `max_notional`,
`credit_limit` (canonical decimal strings), `price_collar_bps`, `duplicate_window_ms`, `throttle_messages`,
`throttle_window_ms` (ints) and `restricted_symbols` (a list, omitted when empty). Each field set replaces the
risk file's value for the account; a field not set keeps the file's. `throttle_messages` and
`throttle_window_ms` go together. The bounds are the risk file's (tradeguard/risk/config.py). The file's global
restricted list applies whatever the override says.

Pure: no grpc, no protobuf, no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from services.trading.errors import FieldViolation, InvalidArgument
from services.trading.model import format_decimal
from tradeguard.risk.config import (
    MAX_COLLAR_BPS,
    MAX_DECIMAL,
    MAX_DUPLICATE_WINDOW_US,
    MAX_THROTTLE_MESSAGES,
    MAX_THROTTLE_WINDOW_US,
    SYMBOL_PATTERN,
)
from tradeguard.risk.model import AccountLimits, Throttle

__all__ = [
    "DECIMAL_FIELDS",
    "INT_FIELDS",
    "apply_override",
    "limits_to_fields",
    "override_from_json",
    "validate_override",
]

DECIMAL_FIELDS: Final = ("max_quantity", "max_notional", "credit_limit")
INT_FIELDS: Final = ("price_collar_bps", "duplicate_window_ms", "throttle_messages", "throttle_window_ms")
_INT_BOUNDS: Final = {
    "price_collar_bps": (1, MAX_COLLAR_BPS),
    "duplicate_window_ms": (0, MAX_DUPLICATE_WINDOW_US // 1000),
    "throttle_messages": (1, MAX_THROTTLE_MESSAGES),
    "throttle_window_ms": (1, MAX_THROTTLE_WINDOW_US // 1000),
}
_MAX_SYMBOLS: Final = 1000
_BPS: Final = Decimal(10_000)


def validate_override(fields: Mapping[str, Any], prefix: str = "limits") -> dict[str, Any]:
    """The canonical override of `fields` (decimals as strings), or InvalidArgument naming every bad field."""
    violations: list[FieldViolation] = []
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = f"{prefix}.{key}"
        if key in DECIMAL_FIELDS:
            try:
                number = Decimal(value) if isinstance(value, str) else None
            except InvalidOperation:
                number = None
            if number is None or not number.is_finite() or not Decimal(0) <= number <= MAX_DECIMAL:
                violations.append(FieldViolation(name, f"must be a decimal number from 0 to {MAX_DECIMAL:f}"))
            else:
                out[key] = format_decimal(number)
        elif key in INT_FIELDS:
            low, high = _INT_BOUNDS[key]
            if type(value) is not int or not low <= value <= high:
                violations.append(FieldViolation(name, f"must be an integer from {low} to {high}"))
            else:
                out[key] = value
        elif key == "restricted_symbols":
            symbols = list(value) if isinstance(value, list | tuple) else None
            if symbols is None or len(symbols) > _MAX_SYMBOLS:
                violations.append(FieldViolation(name, f"must be a list of at most {_MAX_SYMBOLS} symbols"))
            elif any(not isinstance(s, str) or not SYMBOL_PATTERN.fullmatch(s) for s in symbols):
                violations.append(FieldViolation(name, "holds a value that is not a valid symbol"))
            elif len(set(symbols)) != len(symbols):
                violations.append(FieldViolation(name, "lists a symbol twice"))
            elif symbols:
                out[key] = sorted(symbols)
        else:
            violations.append(FieldViolation(name, "is not a risk limit"))
    if ("throttle_messages" in fields) != ("throttle_window_ms" in fields):
        violations.append(FieldViolation(f"{prefix}.throttle_messages", "and throttle_window_ms go together"))
    if violations:
        raise InvalidArgument(violations)
    return out


def override_from_json(text: str) -> dict[str, Any]:
    """A stored override (written by this module: trusted, but checked again)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("a risk override must be a JSON object")
    return validate_override(data)


def override_to_json(override: Mapping[str, Any]) -> str:
    return json.dumps(dict(override), sort_keys=True, separators=(",", ":"))


def apply_override(
    base: AccountLimits, override: Mapping[str, Any], global_restricted: frozenset[str]
) -> AccountLimits:
    """`base` (the file's limits for the account) with the override's fields in place of the file's."""
    changes: dict[str, Any] = {}
    for key in DECIMAL_FIELDS:
        if key in override:
            changes[key] = Decimal(override[key])
    if "price_collar_bps" in override:
        changes["price_collar"] = Decimal(override["price_collar_bps"]) / _BPS
    if "duplicate_window_ms" in override:
        changes["duplicate_window_us"] = int(override["duplicate_window_ms"]) * 1000
    if "throttle_messages" in override:
        changes["throttle"] = Throttle(
            messages=int(override["throttle_messages"]), window_us=int(override["throttle_window_ms"]) * 1000
        )
    if "restricted_symbols" in override:
        changes["restricted_symbols"] = frozenset(override["restricted_symbols"]) | global_restricted
    return dataclasses.replace(base, **changes) if changes else base


def limits_to_fields(limits: AccountLimits) -> dict[str, Any]:
    """The API's RiskLimits fields of `limits` (a check that is off is left out)."""
    out: dict[str, Any] = {}
    for key in DECIMAL_FIELDS:
        value = getattr(limits, key)
        if value is not None:
            out[key] = format_decimal(value)
    if limits.price_collar is not None:
        out["price_collar_bps"] = int(limits.price_collar * _BPS)
    if limits.duplicate_window_us:
        out["duplicate_window_ms"] = limits.duplicate_window_us // 1000
    if limits.throttle is not None:
        out["throttle_messages"] = limits.throttle.messages
        out["throttle_window_ms"] = limits.throttle.window_us // 1000
    if limits.restricted_symbols:
        out["restricted_symbols"] = sorted(limits.restricted_symbols)
    return out
