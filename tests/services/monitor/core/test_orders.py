"""The order_volume and order_notional detectors on synthetic streams (event time is the clock): only OK PlaceOrder
calls count, exactly in Decimal, a market order in volume only; silent through warm-up and within the baseline's
noise; a spike raised by the very order that crosses the limit, once per bucket, with a stable id, per API key and
per account; the limit's boundary (hypothesis); memory bounded by max_subjects; a reload keeps the memory."""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.core.config import RateConfig, Rule
from services.monitor.core.orders import NOTIONAL, VOLUME, OrderSpikes, order_amount
from services.monitor.model import ActionKind, AuditEvent, Finding, Outcome, Severity
from tests.services.monitor.conftest import event

BUCKET_S = 10
PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
TRADING = "spiffe://t/svc/trading"


def config(**overrides: object) -> RateConfig:
    values: dict[str, object] = {
        "enabled": True,
        "bucket_us": BUCKET_S * 1_000_000,
        "alpha": 0.1,
        "warmup_buckets": 10,
        "sigmas": 6.0,
        "max_subjects": 1000,
        "subjects": {
            "api_key": Rule(
                severity=Severity.CRITICAL,
                actions=(ActionKind.NOTIFY, ActionKind.KILL_SWITCH),
                amount=Decimal(10),
            ),
            "account": Rule(amount=Decimal(10)),
        },
    }
    values.update(overrides)
    return RateConfig(**values)  # type: ignore[arg-type]


def order(
    sequence: int,
    seconds: float,
    quantity: str,
    price: str | None = "10",
    *,
    key: str = "k1",
    account: str = "acct-1",
    outcome: Outcome = Outcome.OK,
    method: str = PLACE,
    recorder: str = TRADING,
) -> AuditEvent:
    details = {"symbol": "BTC-USD", "side": "SIDE_BUY", "quantity": quantity}
    if price is not None:
        details["price"] = price
    return event(
        sequence,
        seconds,
        outcome,
        api_key_id=key,
        account_id=account,
        method=method,
        recorder=recorder,
        details=details,
    )


def orders(volumes: list[int], first_sequence: int = 0, price: str | None = "10") -> list[AuditEvent]:
    """Bucket i holds `volumes[i]` orders of quantity 1, spread evenly inside it."""
    events: list[AuditEvent] = []
    sequence = first_sequence
    for bucket, count in enumerate(volumes):
        for i in range(count):
            seconds = bucket * BUCKET_S + (i + 0.5) * BUCKET_S / (count + 1)
            events.append(order(sequence, seconds, "1", price))
            sequence += 1
    return events


def run(detector: OrderSpikes, events: list[AuditEvent]) -> list[tuple[int, Finding]]:
    return [(e.sequence, f) for e in events for f in detector.observe(e)]


def test_what_counts_an_ok_place_order_s_quantity_and_notional_in_decimal() -> None:
    placed = order(0, 0, "0.1", "0.2")
    assert order_amount(placed, VOLUME) == Decimal("0.1")
    assert order_amount(placed, NOTIONAL) == Decimal("0.02")  # exact, not 0.020000000000000004
    market = order(1, 0, "3", None)
    assert order_amount(market, VOLUME) == 3 and order_amount(market, NOTIONAL) is None
    for other in (
        order(2, 0, "5", outcome=Outcome.DENIED_RISK),  # refused: not an order placed
        order(3, 0, "5", outcome=Outcome.FAILED),
        order(4, 0, "5", method="/tradeguard.trading.v1.TradingService/CancelOrder"),
        order(5, 0, "5", recorder="spiffe://t/svc/auth"),  # not a guard's record
        order(6, 0, "NaN"),
        order(7, 0, "-1"),
        order(8, 0, "lots"),
        event(
            9, 0, method=PLACE, recorder=TRADING
        ),  # no details (an event from before the guard recorded them)
    ):
        assert order_amount(other, VOLUME) is None and order_amount(other, NOTIONAL) is None
    assert order_amount(order(10, 0, "2", "Infinity"), NOTIONAL) is None


@pytest.mark.parametrize("measure", [VOLUME, NOTIONAL])
def test_a_steady_key_then_a_spike_alerts_at_the_crossing_order_once_per_subject(measure: str) -> None:
    detector = OrderSpikes(measure, config())
    steady = orders([5] * 30)
    assert run(detector, steady) == []
    spike = orders([0] * 30 + [200], first_sequence=len(steady))
    found = run(detector, spike)
    assert sorted(f.subject_kind for _, f in found) == ["account", "api_key"]  # once per subject per bucket
    for sequence, finding in found:
        assert finding.detector == measure
        scale = 1 if measure == VOLUME else 10  # every order: 1 at 10
        mean = float(finding.evidence["mean"])
        limit = mean + 6 * max(float(finding.evidence["spread"]), math.sqrt(mean), 1.0)
        assert limit > 10  # the baseline's limit, not the threshold, is what was crossed
        amount = Decimal(finding.evidence["volume" if measure == VOLUME else "notional"])
        assert amount == int(finding.evidence["orders"]) * scale
        assert amount == math.floor(limit / scale) * scale + scale  # the first order above the limit
        assert sequence == spike[int(finding.evidence["orders"]) - 1].sequence
        assert finding.window_us == spike[0].time_us // 10_000_000 * 10_000_000
    by_kind = {f.subject_kind: f for _, f in found}
    assert by_kind["api_key"].actions == (ActionKind.NOTIFY, ActionKind.KILL_SWITCH)
    assert by_kind["api_key"].kill_scope == "account" and by_kind["api_key"].account_id == "acct-1"
    assert by_kind["account"].subject == "acct-1" and by_kind["account"].severity == Severity.WARNING


def test_one_large_order_is_a_spike_of_volume_though_not_of_rate() -> None:
    detector = OrderSpikes(VOLUME, config())
    steady = orders([3] * 20)
    assert run(detector, steady) == []
    found = run(detector, [order(len(steady), 20 * BUCKET_S + 1, "500")])
    assert {f.subject_kind for _, f in found} == {"api_key", "account"}


def test_market_orders_count_in_volume_only() -> None:
    notional = OrderSpikes(NOTIONAL, config())
    volume = OrderSpikes(VOLUME, config())
    events = orders([5] * 20) + orders([0] * 20 + [300], first_sequence=100, price=None)
    assert run(notional, events) == []
    assert len(run(volume, events)) == 2


def test_the_same_events_read_again_make_the_same_alert_ids() -> None:
    events = orders([5] * 30 + [100])
    ids = []
    for _ in range(2):
        detector = OrderSpikes(NOTIONAL, config())
        ids.append([f.alert_id for e in events for f in detector.observe(e)])
    assert ids[0] == ids[1] and len(ids[0]) == 2


def test_no_alert_during_warm_up_whatever_the_amount() -> None:
    detector = OrderSpikes(VOLUME, config(warmup_buckets=10))
    assert run(detector, orders([1] * 5 + [500])) == []
    assert run(detector, [order(1000, 5 * BUCKET_S + 9, "1e9")]) == []


def test_the_amount_threshold_holds_back_a_spike_of_a_small_baseline() -> None:
    subjects = {"api_key": Rule(amount=Decimal(1000))}
    detector = OrderSpikes(NOTIONAL, config(subjects=subjects))
    assert (
        run(detector, orders([1] * 20 + [99])) == []
    )  # 990 of notional: over the limit, under the threshold
    detector = OrderSpikes(NOTIONAL, config(subjects=subjects))
    assert len(run(detector, orders([1] * 20 + [100]))) == 1  # 1000 reaches it


@settings(max_examples=60, deadline=None)
@given(
    mean=st.integers(min_value=1, max_value=40),
    jitter=st.lists(st.floats(min_value=-3, max_value=3), min_size=40, max_size=80),
)
def test_volume_within_three_sigma_of_its_baseline_never_alerts(mean: int, jitter: list[float]) -> None:
    volumes = [max(0, round(mean + j * math.sqrt(mean))) for j in jitter]
    assert run(OrderSpikes(VOLUME, config()), orders(volumes)) == []


@settings(max_examples=60, deadline=None)
@given(
    level=st.integers(min_value=0, max_value=60),
    extra=st.integers(min_value=-3, max_value=3),
    price=st.sampled_from(["1", "0.5", "2.25"]),
)
def test_the_limit_is_exact(level: int, extra: int, price: str) -> None:
    """After a perfectly steady history of `level` (one order of that quantity per bucket: mean = level, spread
    0), a bucket's order alerts iff its amount exceeds both the threshold and level + 6 x max(sqrt(level), 1)."""
    for measure, unit in ((VOLUME, Decimal(1)), (NOTIONAL, Decimal(price))):
        base = Decimal(level) * unit
        limit = float(base) + 6 * max(math.sqrt(base), 1.0)
        quantity = max(0, math.floor(limit / float(unit)) + extra)
        events = [order(i, i * BUCKET_S + 1, str(level), price) for i in range(15) if level]
        events.append(order(15, 15 * BUCKET_S + 1, str(quantity), price))
        subjects = {"api_key": Rule(amount=Decimal(20))}
        found = run(OrderSpikes(measure, config(subjects=subjects)), events)
        amount = Decimal(quantity) * unit
        assert bool(found) == (float(amount) > limit and amount >= 20), (measure, amount, limit)


def test_subjects_are_bounded_least_recently_seen_forgotten() -> None:
    detector = OrderSpikes(VOLUME, config(max_subjects=10))
    for i in range(1000):
        detector.observe(order(i, i * 0.01, "1", key=f"key-{i}", account=f"acct-{i}"))
    assert detector.tracked() == 20  # 10 keys and 10 accounts
    detector.configure(config(max_subjects=3))
    assert detector.tracked() == 6


def test_a_reload_keeps_the_baselines() -> None:
    detector = OrderSpikes(VOLUME, config())
    assert run(detector, orders([5] * 30)) == []
    detector.configure(replace(config(), sigmas=3.0))
    assert len(run(detector, orders([0] * 30 + [100], first_sequence=1000))) == 2  # no new warm-up


def test_events_without_the_subject_disabled_or_older_are_ignored() -> None:
    detector = OrderSpikes(VOLUME, config(enabled=False))
    assert run(detector, orders([5] * 20 + [300])) == []
    detector = OrderSpikes(VOLUME, config())
    assert run(detector, [order(i, i * 0.01, "1", key="", account="") for i in range(500)]) == []
    assert detector.tracked() == 0
    detector = OrderSpikes(VOLUME, config())
    assert run(detector, orders([5] * 20)) == []
    late = [order(10_000 + i, 15 * BUCKET_S, "1000") for i in range(3)]  # older than the current bucket
    assert run(detector, late) == []


def test_an_unknown_measure_is_refused() -> None:
    with pytest.raises(ValueError):
        OrderSpikes("order_count", config())
