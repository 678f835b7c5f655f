"""A synthetic normal day for 50 keys through every detector of the PACKAGED configuration raises no alert: the
false-positive count of each detector is 0 (printed with `-s`, kept as user properties).

The day (seeded, so the same every run): 50 API keys of 20 accounts, each with its own rate (0.1 to 1 call per
second on average for five "algos", 0.01 to 0.1 for the rest) following a day curve (quiet at night, a step at
the 08:00 open, busiest mid-day), Poisson counts per 10 s; each key from its own country (two addresses there);
the refusals a day brings: a mistyped secret or a clock off now and then (about one failed authentication per key
per two hours), a method tried without permission (one per key per day), orders over quota or refused by a risk
check (about two per key per hour). Every order placed has a realistic size: each key trades one instrument
(equities at 5 to 500, or a coin at 20,000 to 70,000 in fractions), its quantities log-normal around its own
median (a spread of 0.8: now and then an order ten times the usual), one order in five a market order (no price).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from services.monitor.core.config import parse_config
from services.monitor.core.engine import Detectors
from services.monitor.geoip import GeoLocator
from services.monitor.model import AuditEvent, Outcome
from services.monitor.settings import packaged_config
from tests.services.monitor.conftest import START_US

KEYS = 50
DAY_S = 86_400
BUCKET_S = 10
COUNTRIES = (
    ("81.2.69.160", "81.2.69.161"),
    ("1.0.16.1", "1.0.16.2"),
    ("8.8.8.8", "8.8.4.4"),
    ("200.160.2.3", "200.160.2.4"),
)


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:  # a normal approximation is close enough up there
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def day_curve(second: float) -> float:
    hour = second / 3600
    if hour < 8:
        return 0.15
    return 0.6 + 0.7 * math.sin(math.pi * (hour - 8) / 14) if hour < 22 else 0.2


def order_sizes(rng: random.Random) -> Callable[[], dict[str, str]]:
    """One key's orders: its instrument, price and median quantity; a fresh order's details each call."""
    if rng.random() < 0.2:
        symbol, price, median, places = "BTC-USD", rng.uniform(20_000, 70_000), rng.uniform(0.01, 0.5), 4
    else:
        symbol, price, median, places = (
            f"EQ{rng.randrange(100):02d}",
            rng.uniform(5, 500),
            rng.uniform(5, 300),
            0,
        )
    side = rng.choice(("SIDE_BUY", "SIDE_SELL"))

    def place() -> dict[str, str]:
        quantity = max(
            Decimal(1).scaleb(-places), round(Decimal(rng.lognormvariate(math.log(median), 0.8)), places)
        )
        details = {"symbol": symbol, "side": side, "quantity": str(quantity)}
        if rng.random() >= 0.2:  # a limit order near the price
            details["price"] = f"{price * rng.uniform(0.99, 1.01):.2f}"
        return details

    return place


def normal_day(seed: int = 20261130) -> list[AuditEvent]:
    rng = random.Random(seed)
    # (time, key, address, outcome, method, an order's details)
    events: list[tuple[int, int, str, Outcome, str, dict[str, str]]] = []
    for key in range(KEYS):
        per_s = rng.uniform(0.1, 1.0) if key < 5 else rng.uniform(0.01, 0.1)
        place = order_sizes(rng)
        addresses = COUNTRIES[key % len(COUNTRIES)]
        for bucket in range(DAY_S // BUCKET_S):
            start = bucket * BUCKET_S
            mean = per_s * BUCKET_S * day_curve(start)
            for _ in range(poisson(rng, mean)):
                events.append(
                    (
                        start * 1_000_000 + rng.randrange(BUCKET_S * 1_000_000),
                        key,
                        rng.choice(addresses),
                        Outcome.OK,
                        "PlaceOrder",
                        place(),
                    )
                )
        for _ in range(poisson(rng, 12)):  # failed authentications
            events.append(
                (
                    rng.randrange(DAY_S * 1_000_000),
                    key,
                    rng.choice(addresses),
                    Outcome.DENIED_AUTHENTICATION,
                    "PlaceOrder",
                    {},
                )
            )
        for _ in range(poisson(rng, 1)):  # a method without permission
            events.append(
                (
                    rng.randrange(DAY_S * 1_000_000),
                    key,
                    rng.choice(addresses),
                    Outcome.DENIED_PERMISSION,
                    rng.choice(("SetRiskLimits", "EngageKillSwitch")),
                    {},
                )
            )
        for outcome in (Outcome.DENIED_QUOTA, Outcome.DENIED_RISK):
            for _ in range(poisson(rng, 24)):
                events.append(
                    (
                        rng.randrange(DAY_S * 1_000_000),
                        key,
                        rng.choice(addresses),
                        outcome,
                        "PlaceOrder",
                        place(),
                    )
                )
    events.sort(key=lambda e: e[:2])
    return [
        AuditEvent(
            sequence=i, time_us=START_US + t, record_time_us=START_US + t, recorder="spiffe://t/svc/trading",
            principal=f"usr_{key:02d}", account_id=f"acct-{key % 20:02d}", api_key_id=f"tgk_normal{key:02d}",
            source_ip=address, method=f"/tradeguard.trading.v1.TradingService/{method}", outcome=outcome,
            details=details,
        )
        for i, (t, key, address, outcome, method, details) in enumerate(events)
    ]  # fmt: skip


def test_a_normal_day_for_50_keys_raises_no_alert(record_property: Any) -> None:
    config = parse_config(packaged_config().read_text(), "monitor.yaml")
    detectors = Detectors(lambda: config, GeoLocator().locate)
    day = normal_day()
    findings = [f for i in range(0, len(day), 1000) for f in detectors.detect(day[i : i + 1000])]
    by_detector = Counter(f.detector for f in findings)
    counts = {c.name: by_detector.get(c.name, 0) for c in detectors.counts()}
    outcomes = Counter(e.outcome.name for e in day)
    print(f"\nnormal day: {len(day)} events for {KEYS} keys, {dict(outcomes)}; false positives {counts}")
    record_property("events", len(day))
    for name, count in counts.items():
        record_property(f"false_positives_{name}", count)
    assert findings == [], [(f.detector, f.subject, dict(f.evidence)) for f in findings[:5]]
    assert detectors.geography.tracked() == KEYS  # every key located, from its own country
    assert [o.tracked() for o in detectors.orders] == [
        KEYS + 20,
        KEYS + 20,
    ]  # every key's and account's orders
