"""parse_new_order: every field, by its proto field name, all violations at once."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from services.trading.core import parse_new_order
from services.trading.errors import InvalidArgument
from services.trading.model import OrderLimits, OrderType, Side, TimeInForce, format_decimal

LIMITS = OrderLimits()


def request(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "account_id": "acct-1",
        "client_order_id": "c-1",
        "symbol": "BTC-USD",
        "side": 1,
        "type": 1,
        "time_in_force": 1,
        "quantity": "1.5",
        "price": "100",
        "limits": LIMITS,
    }
    fields.update(overrides)
    return fields


def violations(**overrides: Any) -> list[str]:
    with pytest.raises(InvalidArgument) as info:
        parse_new_order(**request(**overrides))
    assert info.value.reason == "INVALID_ARGUMENT"
    for v in info.value.violations:
        assert v.description
    return [v.field for v in info.value.violations]


def test_valid_limit_order() -> None:
    new = parse_new_order(**request(quantity="1.500", price="0.10000000"))
    assert new.side is Side.BUY and new.type is OrderType.LIMIT and new.time_in_force is TimeInForce.GTC
    assert new.price is not None
    assert format_decimal(new.quantity) == "1.5" and format_decimal(new.price) == "0.1"


def test_valid_market_order() -> None:
    new = parse_new_order(**request(type=2, time_in_force=0, price="", side=2))
    assert new.side is Side.SELL and new.type is OrderType.MARKET
    assert new.time_in_force is TimeInForce.IOC and new.price is None
    assert parse_new_order(**request(type=2, time_in_force=3, price="")).time_in_force is TimeInForce.FOK


def test_limit_defaults_to_gtc() -> None:
    assert parse_new_order(**request(time_in_force=0)).time_in_force is TimeInForce.GTC
    assert parse_new_order(**request(time_in_force=2)).time_in_force is TimeInForce.IOC


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("100", "100"),
        ("1.500", "1.5"),
        ("0.00000001", "0.00000001"),
        ("1.000000000000", "1"),  # trailing zeros are not significant decimals
        ("1000000000000", "1000000000000"),  # exactly the maximum
        ("0.5", "0.5"),
        ("10.0", "10"),
    ],
)
def test_quantity_canonical(text: str, canonical: str) -> None:
    new = parse_new_order(**request(quantity=text, price="1"))
    assert format_decimal(new.quantity) == canonical
    assert new.quantity.as_tuple() == Decimal(canonical).as_tuple()  # same digits and exponent


def test_identifiers_at_their_limits() -> None:
    parse_new_order(
        **request(account_id="a" * 64, client_order_id="x" * 64, symbol="A" * 12 + "/" + "B" * 12)
    )
    parse_new_order(**request(account_id="0_-", client_order_id="a.b:c_d-e", symbol="AAPL"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("account_id", ""),
        ("account_id", "_acct"),
        ("account_id", "-acct"),
        ("account_id", "a" * 65),
        ("account_id", "a b"),
        ("account_id", "a.b"),
        ("account_id", "acct\n"),
        ("account_id", "äcct"),
        ("client_order_id", ""),
        ("client_order_id", "x" * 65),
        ("client_order_id", "a b"),
        ("client_order_id", "a/b"),
        ("client_order_id", "c-1\n"),
        ("symbol", ""),
        ("symbol", "btc-usd"),
        ("symbol", "BTC-"),
        ("symbol", "-USD"),
        ("symbol", "BTC--USD"),
        ("symbol", "BTC-USD-EUR"),
        ("symbol", "BTC_USD"),
        ("symbol", "A" * 13),
        ("symbol", " BTC"),
        ("side", 0),
        ("side", 3),
        ("side", -1),
        ("type", 0),
        ("type", 3),
        ("time_in_force", 4),
        ("time_in_force", -1),
        ("quantity", ""),
        ("quantity", "0"),
        ("quantity", "0.0"),
        ("quantity", "-1"),
        ("quantity", "+1"),
        ("quantity", "1e3"),
        ("quantity", "1E3"),
        ("quantity", "NaN"),
        ("quantity", "nan"),
        ("quantity", "Infinity"),
        ("quantity", "inf"),
        ("quantity", " 1"),
        ("quantity", "1 "),
        ("quantity", "01"),
        ("quantity", "1."),
        ("quantity", ".5"),
        ("quantity", "1,5"),
        ("quantity", "1_000"),
        ("quantity", "0x10"),
        ("quantity", "\u0661"),  # ARABIC-INDIC DIGIT ONE
        ("quantity", "1.123456789"),  # 9 decimal places
        ("quantity", "1000000000000.1"),  # above max_quantity
        ("quantity", "9" * 65),  # too long to even parse
        ("price", ""),  # a limit order needs a price
        ("price", "0"),
        ("price", "-5"),
        ("price", "1e2"),
        ("price", "1000000000001"),
        ("price", "0.000000001"),
    ],
)
def test_each_field_is_validated(field: str, value: str | int) -> None:
    assert violations(**{field: value}) == [field]


def test_market_order_rules() -> None:
    assert violations(type=2, price="100", time_in_force=2) == ["price"]
    assert violations(type=2, price="", time_in_force=1) == ["time_in_force"]


def test_notional_limit() -> None:
    limits = OrderLimits(max_notional=Decimal("1000"))
    assert violations(quantity="10", price="100.00000001", limits=limits) == ["quantity"]
    parse_new_order(**request(quantity="10", price="100", limits=limits))  # exactly the max is fine
    parse_new_order(**request(quantity="1000000", price="1000000000"))  # 1e15: exactly the default max
    assert violations(quantity="1000000.00000001", price="1000000000") == ["quantity"]


def test_all_violations_reported_at_once() -> None:
    fields = violations(
        account_id="",
        client_order_id="bad id",
        symbol="btc",
        side=0,
        type=0,
        time_in_force=9,
        quantity="1e5",
        price="-1",
    )
    assert fields == [
        "account_id",
        "client_order_id",
        "symbol",
        "side",
        "type",
        "time_in_force",
        "quantity",
        "price",
    ]


def descriptions(**overrides: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        parse_new_order(**request(**overrides))
    return {v.field: v.description for v in info.value.violations}


@pytest.mark.parametrize("field", ["quantity", "price"])
@pytest.mark.parametrize("value", ["0", "0.0", "-1", "-0", "-0.5", "-12.50", "-01"])
def test_zero_and_negative_numbers_get_the_same_answer(field: str, value: str) -> None:
    # A negative number is a number: it is refused for its value, as zero is, not for its spelling.
    assert descriptions(**{field: value}) == {field: "must be greater than zero"}


@pytest.mark.parametrize("field", ["quantity", "price"])
@pytest.mark.parametrize(
    "value", ["+1", "1e3", " 1", "1 ", "01", "1.", ".5", "abc", "NaN", "--1", "-1e3", "- 1"]
)
def test_malformed_numbers_say_what_a_plain_decimal_is(field: str, value: str) -> None:
    (description,) = descriptions(**{field: value}).values()
    assert description.startswith("must be a plain decimal number such as 12.5")
    assert "no sign, exponent, spaces or leading zeros" in description
