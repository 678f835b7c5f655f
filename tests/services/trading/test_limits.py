"""Risk-limit overrides (services/trading/limits.py): validated at the risk file's bounds, stored as JSON and read
back the same, applied field by field over the file's limits."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trading.errors import InvalidArgument
from services.trading.limits import (
    apply_override,
    limits_to_fields,
    override_from_json,
    override_to_json,
    validate_override,
)
from tradeguard.risk.model import AccountLimits, Throttle

BASE = AccountLimits(
    max_quantity=Decimal(100),
    max_notional=Decimal(1000),
    price_collar=Decimal("0.1"),
    credit_limit=Decimal(5000),
    restricted_symbols=frozenset({"GME", "BAN"}),
    duplicate_window_us=1_000_000,
    throttle=Throttle(10, 1_000_000),
)

overrides = st.fixed_dictionaries(
    {},
    optional={
        "max_quantity": st.decimals(0, 10**9, places=4).map(str),
        "max_notional": st.decimals(0, 10**12, places=2).map(str),
        "credit_limit": st.decimals(0, 10**12, places=2).map(str),
        "price_collar_bps": st.integers(1, 10_000),
        "duplicate_window_ms": st.integers(0, 3_600_000),
        "restricted_symbols": st.lists(st.from_regex(r"[A-Z]{1,5}", fullmatch=True), min_size=1, unique=True),
    },
)


@given(override=overrides, throttle=st.none() | st.tuples(st.integers(1, 10_000), st.integers(1, 3_600_000)))
def test_a_valid_override_round_trips_and_applies_field_by_field(
    override: dict[str, Any], throttle: tuple[int, int] | None
) -> None:
    if throttle is not None:
        override = override | {"throttle_messages": throttle[0], "throttle_window_ms": throttle[1]}
    canonical = validate_override(override)
    assert override_from_json(override_to_json(canonical)) == canonical
    applied = apply_override(BASE, canonical, frozenset({"BAN"}))
    for key in ("max_quantity", "max_notional", "credit_limit"):
        expected = Decimal(override[key]) if key in override else getattr(BASE, key)
        assert getattr(applied, key) == expected
    if "price_collar_bps" in override:
        assert applied.price_collar == Decimal(override["price_collar_bps"]) / 10_000
    else:
        assert applied.price_collar == BASE.price_collar
    if "restricted_symbols" in override:  # replaces the account's list; the global list stays
        assert applied.restricted_symbols == frozenset(override["restricted_symbols"]) | {"BAN"}
    if throttle is not None:
        assert applied.throttle == Throttle(throttle[0], throttle[1] * 1000)
    fields = limits_to_fields(applied)
    for key in ("max_quantity", "max_notional", "credit_limit"):
        assert Decimal(fields[key]) == getattr(applied, key)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"max_quantity": "-1"}, "limits.max_quantity"),
        ({"max_quantity": "1e30"}, "limits.max_quantity"),
        ({"max_notional": "NaN"}, "limits.max_notional"),
        ({"credit_limit": 5}, "limits.credit_limit"),
        ({"price_collar_bps": 0}, "limits.price_collar_bps"),
        ({"price_collar_bps": 10_001}, "limits.price_collar_bps"),
        ({"duplicate_window_ms": -1}, "limits.duplicate_window_ms"),
        ({"throttle_messages": 5}, "limits.throttle_messages"),
        ({"throttle_messages": 0, "throttle_window_ms": 10}, "limits.throttle_messages"),
        ({"restricted_symbols": ["btc"]}, "limits.restricted_symbols"),
        ({"restricted_symbols": ["A", "A"]}, "limits.restricted_symbols"),
        ({"color": "red"}, "limits.color"),
        ({"price_collar_bps": True}, "limits.price_collar_bps"),
    ],
)
def test_a_bad_override_names_its_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_override(override)
    assert field in [v.field for v in refused.value.violations]


def test_an_empty_override_changes_nothing() -> None:
    assert validate_override({}) == {}
    assert apply_override(BASE, {}, frozenset()) is BASE


def test_limits_to_fields_leaves_out_what_is_off() -> None:
    assert limits_to_fields(AccountLimits()) == {}
    assert limits_to_fields(BASE) == {
        "max_quantity": "100",
        "max_notional": "1000",
        "credit_limit": "5000",
        "price_collar_bps": 1000,
        "duplicate_window_ms": 1000,
        "throttle_messages": 10,
        "throttle_window_ms": 1000,
        "restricted_symbols": ["BAN", "GME"],
    }
