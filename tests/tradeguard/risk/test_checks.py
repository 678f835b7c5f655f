"""The pre-trade risk engine (tradeguard/risk/checks.py): each check rejects what it should and passes the rest,
exactly at each boundary (property tests: at the limit passes, one tick over fails); the duplicate window and
the throttle on a fake clock; an idempotent retry is never a duplicate; the state stays within its bounds
whatever floods it; a reload is seen by the next check."""

from __future__ import annotations

import dataclasses
import decimal
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tradeguard.risk.checks import RiskEngine, credit_check
from tradeguard.risk.model import (
    AccountLimits,
    OrderType,
    RiskCheck,
    RiskConfig,
    RiskOrder,
    RiskRejected,
    Side,
    Throttle,
)
from tradeguard.risk.reference import PriceFeed
from tradeguard.testing import FakeClock

EXACT = decimal.Context(prec=100)  # the default context's 28 digits would round some products
TICK = Decimal("0.00000001")  # the trading API's finest decimal (8 places)
REFERENCE = Decimal("100")


def order(
    quantity: Decimal | str = "1",
    price: Decimal | str | None = "100",
    *,
    account: str = "acct-1",
    symbol: str = "BTC-USD",
    side: Side = Side.BUY,
    client_order_id: str = "c-1",
) -> RiskOrder:
    return RiskOrder(
        account_id=account,
        api_key_id="tgk_1",
        client_order_id=client_order_id,
        symbol=symbol,
        side=side,
        type=OrderType.MARKET if price is None else OrderType.LIMIT,
        quantity=Decimal(quantity),
        price=None if price is None else Decimal(price),
    )


def engine(limits: AccountLimits, clock: FakeClock | None = None, **bounds: int) -> RiskEngine:
    clock = clock or FakeClock()
    feed = PriceFeed(clock)
    feed.set("BTC-USD", REFERENCE)
    config = RiskConfig(defaults=limits)
    return RiskEngine(lambda: config, feed, clock, **bounds)


def rejected(risk: RiskEngine, o: RiskOrder, open_notional: Decimal | None = None) -> RiskRejected:
    with pytest.raises(RiskRejected) as caught:
        risk.check(o, open_notional)
    return caught.value


# decimals of the trading API's form: positive, at most 8 places
amounts = st.decimals(
    min_value=TICK, max_value=Decimal("1e9"), places=8, allow_nan=False, allow_infinity=False
)


# --- no limits -----------------------------------------------------------------------------------------------


def test_with_no_limits_every_order_passes_and_its_notional_is_returned() -> None:
    risk = engine(AccountLimits())
    assert risk.check(order("3", "2.5"), Decimal(10**30)) == Decimal("7.5")
    assert risk.check(order("3", None)) is None  # a market order: no notional needed, no reference read
    assert (risk.duplicate_records, risk.throttled_accounts) == (0, 0)


# --- per-order boundaries --------------------------------------------------------------------------------------


@given(limit=amounts)
def test_max_quantity_passes_at_the_limit_and_fails_one_tick_over(limit: Decimal) -> None:
    risk = engine(AccountLimits(max_quantity=limit))
    risk.check(order(limit, "1"))
    error = rejected(risk, order(limit + TICK, "1"))
    assert error.reason == "RISK_MAX_QUANTITY" and error.check is RiskCheck.MAX_QUANTITY
    assert Decimal(error.metadata["limit"]) == limit
    assert Decimal(error.metadata["actual"]) == limit + TICK


@given(quantity=amounts, price=amounts)
def test_max_notional_passes_at_the_limit_and_fails_one_tick_over(quantity: Decimal, price: Decimal) -> None:
    notional = EXACT.multiply(quantity, price)
    at_limit = engine(AccountLimits(max_notional=notional))
    assert at_limit.check(order(quantity, price)) == notional
    below = engine(AccountLimits(max_notional=notional - TICK))
    error = rejected(below, order(quantity, price))
    assert error.reason == "RISK_MAX_NOTIONAL"
    assert Decimal(error.metadata["actual"]) == notional


def test_a_notional_on_a_boundary_is_not_decided_by_rounding() -> None:
    # 28 digits (the default decimal context) would round this product up to the limit and let it pass
    quantity, price = Decimal("999999999.99999999"), Decimal("999999999.99999999")
    exact = Decimal("999999999999999980.0000000000000001")
    assert engine(AccountLimits(max_notional=exact)).check(order(quantity, price)) == exact
    assert rejected(engine(AccountLimits(max_notional=exact - TICK)), order(quantity, price)).reason == (
        "RISK_MAX_NOTIONAL"
    )


@given(bps=st.integers(1, 10_000), reference=amounts)
def test_the_collar_passes_both_edges_and_fails_one_tick_outside(bps: int, reference: Decimal) -> None:
    collar = Decimal(bps) / 10_000
    clock = FakeClock()
    feed = PriceFeed(clock)
    feed.set("BTC-USD", reference)
    config = RiskConfig(defaults=AccountLimits(price_collar=collar))
    risk = RiskEngine(lambda: config, feed, clock)
    high = reference + reference * collar
    low = reference - reference * collar
    risk.check(order("1", high))
    risk.check(order("1", reference))
    if low > 0:
        risk.check(order("1", low))
    above = rejected(risk, order("1", high + TICK))
    assert (above.reason, Decimal(above.metadata["limit"])) == ("RISK_PRICE_COLLAR", high)
    assert Decimal(above.metadata["reference_price"]) == reference
    if low - TICK > 0:
        below = rejected(risk, order("1", low - TICK))
        assert (below.reason, Decimal(below.metadata["limit"])) == ("RISK_PRICE_COLLAR", low)
        assert Decimal(below.metadata["actual"]) == low - TICK


@given(limit=amounts, open_notional=amounts, quantity=amounts)
def test_credit_passes_at_the_limit_and_fails_one_tick_over(
    limit: Decimal, open_notional: Decimal, quantity: Decimal
) -> None:
    risk = engine(AccountLimits(credit_limit=open_notional + quantity))
    assert risk.check(order(quantity, "1"), open_notional) == quantity
    tight = engine(AccountLimits(credit_limit=open_notional + quantity - TICK))
    error = rejected(tight, order(quantity, "1"), open_notional)
    assert error.reason == "RISK_CREDIT_LIMIT"
    assert Decimal(error.metadata["actual"]) == open_notional + quantity
    assert Decimal(error.metadata["open_notional"]) == open_notional
    assert Decimal(error.metadata["order_notional"]) == quantity
    # the pure function, alone: no limit, nothing refused
    credit_check(None, limit * 10, limit, order())


def test_credit_is_left_to_the_store_when_no_open_notional_is_given() -> None:
    risk = engine(AccountLimits(credit_limit=Decimal("100")))
    o = order("2", "100")
    notional = risk.check(o)  # no open notional: the store checks in its transaction
    assert notional == Decimal("200")
    with pytest.raises(RiskRejected, match="credit limit"):
        risk.check_credit(o, notional, Decimal(0))
    risk.check_credit(order("1", "100"), Decimal("100"), Decimal(0))  # exactly at the limit


def test_a_restricted_symbol_is_refused() -> None:
    risk = engine(AccountLimits(restricted_symbols=frozenset({"GME"})))
    error = rejected(risk, order(symbol="GME"))
    assert (error.reason, error.metadata["actual"], error.metadata["symbol"]) == (
        "RISK_RESTRICTED_SYMBOL",
        "GME",
        "GME",
    )
    risk.check(order(symbol="BTC-USD"))


# --- reference prices: fail closed ---------------------------------------------------------------------------


def test_a_collar_without_a_reference_price_fails_closed() -> None:
    clock = FakeClock()
    feed = PriceFeed(clock, max_age_us=1_000_000)
    config = RiskConfig(defaults=AccountLimits(price_collar=Decimal("0.05")))
    risk = RiskEngine(lambda: config, feed, clock)
    assert rejected(risk, order()).reason == "RISK_NO_REFERENCE_PRICE"  # none at all
    feed.set("BTC-USD", REFERENCE)
    risk.check(order())
    clock.advance(1_000_000)
    risk.check(order(client_order_id="c-2"))  # exactly max_age old: still current
    clock.advance(1)
    assert rejected(risk, order(client_order_id="c-3")).reason == "RISK_NO_REFERENCE_PRICE"  # stale


def test_a_market_order_takes_its_notional_from_the_reference_price_or_fails_closed() -> None:
    risk = engine(AccountLimits(max_notional=Decimal("500"), price_collar=Decimal("0.01")))
    assert risk.check(order("5", None)) == Decimal("500")  # 5 x 100; no collar on a market order
    assert rejected(risk, order("5.00000001", None)).reason == "RISK_MAX_NOTIONAL"
    no_price = rejected(risk, order("1", None, symbol="ETH-USD"))
    assert no_price.reason == "RISK_NO_REFERENCE_PRICE"
    credit_only = engine(AccountLimits(credit_limit=Decimal("1000")))
    assert rejected(credit_only, order("1", None, symbol="ETH-USD")).reason == "RISK_NO_REFERENCE_PRICE"


# --- duplicates ------------------------------------------------------------------------------------------------


def test_the_same_order_within_the_window_is_a_duplicate_and_after_it_is_not() -> None:
    clock = FakeClock()
    risk = engine(AccountLimits(duplicate_window_us=1_000_000), clock)
    risk.check(order(client_order_id="a"))
    clock.advance(999_999)
    error = rejected(risk, order(client_order_id="b"))
    assert error.reason == "RISK_DUPLICATE_ORDER"
    assert error.metadata["original_client_order_id"] == "a"
    assert (error.metadata["limit"], error.metadata["actual"]) == ("1000000us", "999999us")
    clock.advance(1)  # exactly the window later: no longer a duplicate
    risk.check(order(client_order_id="b"))
    assert rejected(risk, order(client_order_id="c")).metadata["original_client_order_id"] == "b"


def test_what_makes_an_order_the_same() -> None:
    risk = engine(AccountLimits(duplicate_window_us=1_000_000))
    risk.check(order("1.5", "100", client_order_id="a"))
    assert rejected(risk, order("1.50", "100.000", client_order_id="b")).reason == "RISK_DUPLICATE_ORDER"
    for i, different in enumerate(
        [
            order("1.6", "100"),
            order("1.5", "101"),
            order("1.5", None),
            order("1.5", "100", side=Side.SELL),
            order("1.5", "100", account="acct-2"),
            order("1.5", "100", symbol="ETH-USD"),
        ]
    ):
        risk.check(dataclasses.replace(different, client_order_id=f"d-{i}"))


def test_an_idempotent_retry_is_never_a_duplicate() -> None:
    risk = engine(AccountLimits(duplicate_window_us=10_000_000))
    first = order(client_order_id="same")
    risk.check(first)
    for _ in range(3):
        risk.check(first)  # the same client_order_id: a retry, never a duplicate
    assert rejected(risk, order(client_order_id="other")).reason == "RISK_DUPLICATE_ORDER"


def test_a_retry_within_the_window_leaves_the_record_as_it_was() -> None:
    clock = FakeClock()
    risk = engine(AccountLimits(duplicate_window_us=1_000_000), clock)
    risk.check(order(client_order_id="a"))
    clock.advance(900_000)
    risk.check(order(client_order_id="a"))  # a retry: the window still runs from the first acceptance
    clock.advance(100_000)
    risk.check(order(client_order_id="b"))


def test_a_retracted_retry_takes_back_its_message() -> None:
    clock = FakeClock()
    risk = engine(AccountLimits(throttle=Throttle(messages=2, window_us=1_000_000)), clock)
    risk.check(order(client_order_id="a"))
    clock.advance(1)
    retried_at = clock()
    for _ in range(3):  # the same order again: each found placed afterwards, and taken back
        risk.check(order(client_order_id="a"), now_us=retried_at)
        risk.retract(order(client_order_id="a"), retried_at)
    risk.check(order("2", client_order_id="b"))  # the second message of the window
    assert rejected(risk, order("3", client_order_id="c")).reason == "RISK_MESSAGE_THROTTLE"


def test_a_retracted_refusal_takes_back_only_what_it_counted() -> None:
    clock = FakeClock()
    limits = AccountLimits(throttle=Throttle(messages=2, window_us=1_000_000), max_quantity=Decimal(1))
    risk = engine(limits, clock)
    risk.check(order(client_order_id="a"))
    clock.advance(1)
    refused = rejected(risk, order("5", client_order_id="a"))  # counted, then refused: a retry after all
    risk.retract(order("5", client_order_id="a"), clock(), refused)
    risk.check(order("0.5", client_order_id="b"))
    # throttled at the same µs: not counted, so nothing to take back
    throttled = rejected(risk, order("0.25", client_order_id="b"))
    assert throttled.reason == "RISK_MESSAGE_THROTTLE"
    risk.retract(order("0.25", client_order_id="b"), clock(), throttled)
    assert rejected(risk, order("0.75", client_order_id="c")).reason == "RISK_MESSAGE_THROTTLE"


def test_a_discarded_order_at_its_check_time_leaves_the_record_of_another_time() -> None:
    """With the time of its check: only the record that check made goes (a different order under a
    client_order_id already placed); a retry's record is the placed order's and stays."""
    clock = FakeClock()
    risk = engine(AccountLimits(duplicate_window_us=10_000_000), clock)
    risk.check(order("1", client_order_id="a"))
    clock.advance(1)
    risk.check(order("2", client_order_id="a"), now_us=clock())
    risk.discard(order("2", client_order_id="a"), clock())
    risk.check(order("2", client_order_id="b"))
    risk.check(order("1", client_order_id="a"), now_us=clock())  # a retry: "a"'s record is older
    risk.discard(order("1", client_order_id="a"), clock())
    assert rejected(risk, order("1", client_order_id="c")).metadata["original_client_order_id"] == "a"


def test_a_discarded_order_is_not_the_original_of_a_duplicate() -> None:
    risk = engine(AccountLimits(duplicate_window_us=10_000_000))
    risk.check(order(client_order_id="a"))
    risk.discard(order(client_order_id="not-a"))  # only the order that was recorded is forgotten
    assert rejected(risk, order(client_order_id="b")).reason == "RISK_DUPLICATE_ORDER"
    risk.discard(order(client_order_id="a"))  # "a" was not placed after all
    risk.check(order(client_order_id="b"))


def test_a_rejected_order_is_not_recorded() -> None:
    risk = engine(AccountLimits(duplicate_window_us=10_000_000, max_quantity=Decimal("1")))
    rejected(risk, order("2", client_order_id="a"))
    assert risk.duplicate_records == 0


def test_duplicate_records_stay_within_their_bound_and_expire() -> None:
    clock = FakeClock()
    risk = engine(AccountLimits(duplicate_window_us=1_000_000), clock, max_duplicates=50)
    for i in range(1_000):
        risk.check(order(str(i + 1), account=f"acct-{i}", client_order_id=f"c-{i}"))
        assert risk.duplicate_records <= 50
    assert risk.duplicate_records == 50
    # the most recent are kept (a flood shortens the window, never blocks an order)
    assert (
        rejected(risk, order("1000", account="acct-999", client_order_id="x")).reason
        == "RISK_DUPLICATE_ORDER"
    )
    risk.check(order("1", account="acct-0", client_order_id="x"))  # evicted long ago
    clock.advance(1_000_000)
    risk.check(order("7", client_order_id="late"))  # one record; everything older than the window is dropped
    assert risk.duplicate_records == 1


# --- the message throttle --------------------------------------------------------------------------------------


def test_the_throttle_passes_n_in_any_window_and_refuses_the_next() -> None:
    clock = FakeClock()
    risk = engine(AccountLimits(throttle=Throttle(messages=3, window_us=1_000_000)), clock)
    for i in range(3):
        risk.check(order(client_order_id=f"c-{i}"))
        clock.advance(100_000)
    error = rejected(risk, order(client_order_id="c-3"))  # at 300 ms: three in the window already
    assert error.reason == "RISK_MESSAGE_THROTTLE"
    assert error.metadata["limit"] == "3 per 1000000us"
    assert error.retry_after_seconds == pytest.approx(0.7)
    risk.check(order(client_order_id="c-0", account="acct-2"))  # per account
    clock.advance(699_999)
    assert rejected(risk, order(client_order_id="c-4")).reason == "RISK_MESSAGE_THROTTLE"
    clock.advance(1)  # the first message leaves the window: one more passes, and only one
    risk.check(order(client_order_id="c-5"))
    assert rejected(risk, order(client_order_id="c-6")).reason == "RISK_MESSAGE_THROTTLE"


def test_a_message_counts_even_when_a_later_check_refuses_it() -> None:
    risk = engine(AccountLimits(throttle=Throttle(messages=2, window_us=1_000_000), max_quantity=Decimal(1)))
    rejected(risk, order("5"))
    rejected(risk, order("5"))
    assert rejected(risk, order("1")).reason == "RISK_MESSAGE_THROTTLE"


def test_throttled_accounts_stay_within_their_bound() -> None:
    risk = engine(AccountLimits(throttle=Throttle(messages=1, window_us=10_000_000)), max_accounts=20)
    for i in range(500):
        risk.check(order(account=f"acct-{i}", client_order_id=f"c-{i}"))
        assert risk.throttled_accounts <= 20
    assert rejected(risk, order(account="acct-499")).reason == "RISK_MESSAGE_THROTTLE"  # recent: kept


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 400_000)), min_size=1, max_size=200))
def test_a_flood_never_grows_the_state_beyond_its_bounds(flood: list[tuple[int, int]]) -> None:
    clock = FakeClock()
    limits = AccountLimits(duplicate_window_us=5_000_000, throttle=Throttle(messages=4, window_us=1_000_000))
    risk = engine(limits, clock, max_duplicates=30, max_accounts=10)
    for n, (account, step) in enumerate(flood):
        clock.advance(step)
        try:
            risk.check(order(str(n + 1), account=f"acct-{account}", client_order_id=f"c-{n}"))
        except RiskRejected as error:
            assert error.reason == "RISK_MESSAGE_THROTTLE"
        assert risk.duplicate_records <= 30 and risk.throttled_accounts <= 10


# --- configuration in force ------------------------------------------------------------------------------------


def test_accounts_get_their_own_limits_and_the_others_the_defaults_and_a_reload_is_seen_at_once() -> None:
    clock = FakeClock()
    feed = PriceFeed(clock)
    config = RiskConfig(
        defaults=AccountLimits(max_quantity=Decimal(10)),
        accounts={"acct-big": AccountLimits(max_quantity=Decimal(1000))},
    )
    current = [config]
    risk = RiskEngine(lambda: current[0], feed, clock)
    risk.check(order("1000", account="acct-big"))
    assert rejected(risk, order("11", account="acct-other")).reason == "RISK_MAX_QUANTITY"
    current[0] = RiskConfig(defaults=AccountLimits(max_quantity=Decimal(100)))
    risk.check(order("11", account="acct-other"))
    assert rejected(risk, order("1000", account="acct-big")).reason == "RISK_MAX_QUANTITY"
    assert risk.limits_for("acct-big").max_quantity == Decimal(100)


def test_a_throttle_changed_by_a_reload_keeps_the_recent_messages() -> None:
    clock = FakeClock()
    current = [RiskConfig(defaults=AccountLimits(throttle=Throttle(messages=5, window_us=1_000_000)))]
    risk = RiskEngine(lambda: current[0], PriceFeed(clock), clock)
    for i in range(3):
        risk.check(order(client_order_id=f"c-{i}"))
    current[0] = RiskConfig(defaults=AccountLimits(throttle=Throttle(messages=2, window_us=1_000_000)))
    assert rejected(risk, order(client_order_id="c-3")).reason == "RISK_MESSAGE_THROTTLE"


def test_the_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        engine(AccountLimits(), max_duplicates=0)
