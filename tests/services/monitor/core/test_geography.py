"""The geography detectors on synthetic streams: a key's first country learned silently, a new one alerted once
per event; impossible travel when distance less slack exceeds the speed over the time (boundary by hypothesis);
unlocated addresses ignored; the haversine distance against known figures; memory bounded."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.core.config import GeoConfig, Rule
from services.monitor.core.geography import IMPOSSIBLE_TRAVEL, NEW_COUNTRY, Geography, Location, distance_km
from services.monitor.model import ActionKind, Severity
from tests.services.monitor.conftest import PRIVATE, event, locate

GB, GB2, FR, JP = "192.0.2.1", "192.0.2.2", "198.51.100.1", "203.0.113.1"


def config(**overrides: object) -> GeoConfig:
    values: dict[str, object] = {
        "enabled": True,
        "max_keys": 1000,
        "max_countries": 16,
        "max_speed_kmh": 1000.0,
        "slack_km": 500.0,
        "new_country": Rule(severity=Severity.WARNING),
        "impossible_travel": Rule(
            severity=Severity.CRITICAL, actions=(ActionKind.NOTIFY, ActionKind.REVOKE_KEY)
        ),
    }
    values.update(overrides)
    return GeoConfig(**values)  # type: ignore[arg-type]


def test_distance_km_matches_known_figures() -> None:
    london, paris = Location("GB", 51.5074, -0.1278), Location("FR", 48.8566, 2.3522)
    assert distance_km(london, paris) == pytest.approx(343.5, abs=1.0)
    assert distance_km(london, london) == 0
    antipodes = distance_km(Location("A", 0, 0), Location("B", 0, 180))
    assert antipodes == pytest.approx(math.pi * 6371.0088, rel=1e-9)


def test_a_new_country_is_alerted_the_first_one_learned() -> None:
    geo = Geography(config(impossible_travel=None), locate)
    assert geo.observe(event(0, 0, api_key_id="k1", source_ip=GB)) == []
    assert geo.observe(event(1, 10, api_key_id="k1", source_ip=GB2)) == []  # same country, other address
    found = geo.observe(event(2, 86_400, api_key_id="k1", source_ip=FR))
    assert [(f.detector, f.evidence["country"], f.evidence["known_countries"]) for f in found] == [
        (NEW_COUNTRY, "FR", "GB")
    ]
    assert geo.observe(event(3, 90_000, api_key_id="k1", source_ip=FR)) == []  # known now


def test_impossible_travel_raises_with_its_figures() -> None:
    geo = Geography(config(), locate)
    geo.observe(event(0, 0, api_key_id="k1", source_ip=GB, account_id="acct-1"))
    found = geo.observe(event(1, 60, api_key_id="k1", source_ip=JP, account_id="acct-1"))
    assert {f.detector for f in found} == {NEW_COUNTRY, IMPOSSIBLE_TRAVEL}
    travel = next(f for f in found if f.detector == IMPOSSIBLE_TRAVEL)
    assert (travel.evidence["from_country"], travel.evidence["to_country"]) == ("GB", "JP")
    assert float(travel.evidence["distance_km"]) > 8000 and float(travel.evidence["seconds"]) == 60
    assert travel.sequences == (0, 1) and travel.actions == (ActionKind.NOTIFY, ActionKind.REVOKE_KEY)
    assert travel.api_key_id == "k1" and travel.account_id == "acct-1"


def test_neighbours_within_the_slack_are_never_impossible() -> None:
    geo = Geography(config(slack_km=1200.0), locate)  # the GB and FR centroids are 1,095 km apart
    geo.observe(event(0, 0, api_key_id="k1", source_ip=GB))
    found = geo.observe(event(1, 1, api_key_id="k1", source_ip=FR))
    assert [f.detector for f in found] == [NEW_COUNTRY]


@settings(max_examples=100, deadline=None)
@given(factor=st.floats(min_value=0.5, max_value=2.0))
def test_the_speed_boundary(factor: float) -> None:
    """GB then JP after the time the maximum speed needs for the distance less slack, times `factor`: impossible
    iff faster (factor < 1)."""
    cfg = config(new_country=None)
    effective = distance_km(locate(GB), locate(JP)) - cfg.slack_km  # type: ignore[arg-type]
    seconds = effective / cfg.max_speed_kmh * 3600 * factor
    geo = Geography(cfg, locate)
    geo.observe(event(0, 0, api_key_id="k1", source_ip=GB))
    found = geo.observe(event(1, seconds, api_key_id="k1", source_ip=JP))
    if abs(factor - 1) > 1e-6:
        assert bool(found) == (factor < 1)


def test_unlocated_addresses_and_keyless_events_are_ignored() -> None:
    geo = Geography(config(), locate)
    geo.observe(event(0, 0, api_key_id="k1", source_ip=GB))
    assert geo.observe(event(1, 1, api_key_id="k1", source_ip=PRIVATE)) == []
    assert geo.observe(event(2, 2, source_ip=JP)) == []
    assert geo.observe(event(3, 3, api_key_id="k1", source_ip="")) == []
    assert geo.tracked() == 1


def test_the_same_events_make_the_same_ids() -> None:
    stream = [event(0, 0, api_key_id="k1", source_ip=GB), event(1, 30, api_key_id="k1", source_ip=JP)]
    runs = []
    for _ in range(2):
        geo = Geography(config(), locate)
        runs.append([f.alert_id for e in stream for f in geo.observe(e)])
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_keys_and_countries_are_bounded() -> None:
    geo = Geography(config(max_keys=5, max_countries=2), locate)
    for i in range(100):
        geo.observe(event(i, i, api_key_id=f"k{i}", source_ip=GB))
    assert geo.tracked() == 5
    for i, ip in enumerate([GB, FR, JP, GB]):  # GB forgotten once FR and JP are the last two: new again
        found = geo.observe(event(200 + i, 100_000 * (i + 1), api_key_id="kx", source_ip=ip))
        if i == 3:
            assert [f.detector for f in found] == [NEW_COUNTRY]
