"""The in-process reference price feed (tradeguard/risk/reference.py): a price is current up to its maximum age
and missing after it; only finite positive decimals; a bounded number of symbols."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradeguard.risk.reference import PriceFeed, ReferencePrices
from tradeguard.testing import FakeClock


def test_a_price_is_current_up_to_its_maximum_age() -> None:
    clock = FakeClock()
    feed: ReferencePrices = PriceFeed(clock, max_age_us=500)
    assert feed.price("BTC-USD") is None
    assert isinstance(feed, PriceFeed)
    feed.set("BTC-USD", Decimal("64000.5"))
    assert feed.price("BTC-USD") == Decimal("64000.5")
    clock.advance(500)
    assert feed.price("BTC-USD") == Decimal("64000.5")
    clock.advance(1)
    assert feed.price("BTC-USD") is None  # stale counts as missing
    feed.set("BTC-USD", Decimal("64001"))
    assert feed.price("BTC-USD") == Decimal("64001")


@given(age=st.integers(0, 10_000), max_age=st.integers(1, 10_000))
def test_staleness_is_exact(age: int, max_age: int) -> None:
    clock = FakeClock()
    feed = PriceFeed(clock, max_age_us=max_age)
    feed.set("X", Decimal(1), at_us=clock() - age)  # observed `age` µs ago
    assert (feed.price("X") is not None) == (age <= max_age)


def test_update_sets_several_at_once_and_remove_drops_one() -> None:
    clock = FakeClock()
    feed = PriceFeed(clock)
    feed.update({"A": Decimal(1), "B": Decimal("2.5")})
    assert (feed.price("A"), feed.price("B"), len(feed)) == (Decimal(1), Decimal("2.5"), 2)
    feed.remove("A")
    feed.remove("never")
    assert (feed.price("A"), len(feed)) == (None, 1)


def test_a_stale_price_is_still_in_the_feed() -> None:
    clock = FakeClock()
    feed = PriceFeed(clock, max_age_us=10)
    feed.set("A", Decimal(1))
    clock.advance(11)
    assert feed.price("A") is None and "A" in feed and "B" not in feed


@pytest.mark.parametrize("bad", [Decimal(0), Decimal(-1), Decimal("NaN"), Decimal("Infinity"), 5, 5.0])
def test_only_finite_positive_decimals_are_prices(bad: object) -> None:
    with pytest.raises(ValueError, match="finite positive Decimal"):
        PriceFeed(FakeClock()).set("A", bad)  # type: ignore[arg-type]


def test_the_feed_holds_a_bounded_number_of_symbols() -> None:
    feed = PriceFeed(FakeClock(), max_symbols=3)
    feed.update({"A": Decimal(1), "B": Decimal(1), "C": Decimal(1)})
    feed.set("A", Decimal(2))  # a known symbol: updated
    with pytest.raises(ValueError, match="3 symbols already"):
        feed.set("D", Decimal(1))
    assert len(feed) == 3
    with pytest.raises(ValueError, match="positive"):
        PriceFeed(FakeClock(), max_age_us=0)
