"""The risk checks' types (tradeguard/risk/model.py): a rejection reaches the caller as FAILED_PRECONDITION with an
ErrorInfo whose reason is the check's code and whose metadata carries the values that failed; the enums carry
the trading API's numbers; a config finds an account's limits or the defaults."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest
from google.rpc import error_details_pb2

from tradeguard.errors import Code, FailedPrecondition
from tradeguard.risk.model import (
    AccountLimits,
    OrderType,
    RiskCheck,
    RiskConfig,
    RiskOrder,
    RiskRejected,
    Side,
    plain,
)
from tradeguard.rpc.errors import to_rpc_status
from tradeguard.trading.v1 import trading_pb2

ORDER = RiskOrder("acct-1", "tgk_1", "c-1", "BTC-USD", Side.BUY, OrderType.LIMIT, Decimal(2), Decimal(3))


def test_a_rejection_is_failed_precondition_with_the_reason_and_the_values() -> None:
    error = RiskRejected(RiskCheck.CREDIT_LIMIT, ORDER, "100", "106", {"open_notional": "100"})
    assert isinstance(error, FailedPrecondition) and error.code is Code.FAILED_PRECONDITION
    code, status, trailers = to_rpc_status(error)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and trailers == []
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "RISK_CREDIT_LIMIT"
    assert dict(info.metadata) == {
        "limit": "100",
        "actual": "106",
        "account_id": "acct-1",
        "symbol": "BTC-USD",
        "open_notional": "100",
    }
    assert "credit limit" in status.message and "limit 100, actual 106" in status.message


def test_a_throttle_rejection_carries_when_to_retry() -> None:
    error = RiskRejected(RiskCheck.MESSAGE_THROTTLE, ORDER, "3 per 1000000us", "4 in 10us")
    error.retry_after_seconds = 0.25
    _, status, _ = to_rpc_status(error)
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)  # after the ErrorInfo
    assert retry.retry_delay.ToNanoseconds() == 250_000_000


def test_every_check_has_its_code() -> None:
    assert {c.value for c in RiskCheck} == {
        "RISK_MAX_QUANTITY",
        "RISK_MAX_NOTIONAL",
        "RISK_PRICE_COLLAR",
        "RISK_NO_REFERENCE_PRICE",
        "RISK_CREDIT_LIMIT",
        "RISK_RESTRICTED_SYMBOL",
        "RISK_DUPLICATE_ORDER",
        "RISK_MESSAGE_THROTTLE",
    }
    for check in RiskCheck:
        assert RiskRejected(check, ORDER, "1", "2").reason == check.value


def test_the_enums_carry_the_trading_apis_numbers() -> None:
    assert [int(Side.BUY), int(Side.SELL)] == [trading_pb2.SIDE_BUY, trading_pb2.SIDE_SELL]
    assert [int(OrderType.LIMIT), int(OrderType.MARKET)] == [
        trading_pb2.ORDER_TYPE_LIMIT,
        trading_pb2.ORDER_TYPE_MARKET,
    ]


def test_a_config_finds_an_accounts_limits_or_the_defaults() -> None:
    own = AccountLimits(max_quantity=Decimal(5), duplicate_window_us=7)
    defaults = AccountLimits(duplicate_window_us=3)
    config = RiskConfig(defaults=defaults, accounts={"a": own})
    assert (config.limits_for("a"), config.limits_for("b")) == (own, defaults)
    assert config.max_duplicate_window_us == 7
    assert AccountLimits(credit_limit=Decimal(1)).needs_reference
    assert not AccountLimits(price_collar=Decimal("0.1")).needs_reference


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1E+3"), "1000"),
        (Decimal("1.500"), "1.5"),
        (Decimal("0E-8"), "0"),
        (Decimal("-2.50"), "-2.5"),
        (7, "7"),
    ],
)
def test_values_are_written_plain(value: Decimal | int, text: str) -> None:
    assert plain(value) == text
