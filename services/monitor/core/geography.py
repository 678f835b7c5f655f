"""Where each API key is used from: detectors `new_country` and `impossible_travel` (one `Geography` object).

Each call made with an API key (`is_traffic`: not the auth service's or the key vault's own security events, such
as an operator creating the key from the office) from a public source address is located (`locate(ip)`: the country and the
coordinates of its centroid, or None for a private, reserved or unknown address — such events are not judged).
Per key, the countries seen (at most `max_countries`, the oldest forgotten) and the last located use (time,
country, coordinates, address) are remembered, at most `max_keys` keys, least recently seen forgotten.

- `new_country`: a key already seen from some country is used from one it was never seen from. The first
  country of a key is learned silently. Window (id): the event's time — each new country is its own alert.
- `impossible_travel`: consecutive uses of a key from two different countries whose great-circle distance
  (haversine, Earth radius 6371.0088 km), less `slack_km` (countries are areas, their centroids only points), is
  greater than `max_speed_kmh` x the time between them. Window (id): the later event's time.

Both are pure functions of the events read, so reading the same events again raises the same alerts.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from services.monitor.core.config import GeoConfig, Rule
from services.monitor.core.lru import Bounded
from services.monitor.core.subjects import finding, is_traffic
from services.monitor.model import AuditEvent, Finding

__all__ = [
    "EARTH_RADIUS_KM",
    "IMPOSSIBLE_TRAVEL",
    "NEW_COUNTRY",
    "Geography",
    "Locate",
    "Location",
    "distance_km",
]

NEW_COUNTRY: Final = "new_country"
IMPOSSIBLE_TRAVEL: Final = "impossible_travel"
EARTH_RADIUS_KM: Final = 6371.0088


@dataclass(frozen=True, slots=True)
class Location:
    country: str  # ISO 3166-1 alpha-2
    latitude: float
    longitude: float


Locate = Callable[[str], Location | None]


def distance_km(a: Location, b: Location) -> float:
    """The great-circle distance between two points (haversine)."""
    phi1, phi2 = math.radians(a.latitude), math.radians(b.latitude)
    dphi = phi2 - phi1
    dlambda = math.radians(b.longitude - a.longitude)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass(slots=True)
class _Key:
    countries: OrderedDict[str, None] = field(default_factory=OrderedDict)
    last: tuple[int, Location, str, int] | None = None  # time, location, address, sequence


class Geography:
    """The `new_country` and `impossible_travel` detectors (see the module)."""

    def __init__(self, config: GeoConfig, locate: Locate) -> None:
        self.config = config
        self._locate = locate
        self._keys: Bounded[str, _Key] = Bounded(config.max_keys)
        self.alerts = {NEW_COUNTRY: 0, IMPOSSIBLE_TRAVEL: 0}

    def configure(self, config: GeoConfig) -> None:
        self.config = config
        self._keys.resize(config.max_keys)

    def tracked(self) -> int:
        return len(self._keys)

    def observe(self, event: AuditEvent) -> list[Finding]:
        config = self.config
        if not config.enabled or not event.api_key_id or not event.source_ip or not is_traffic(event):
            return []
        here = self._locate(event.source_ip)
        if here is None:
            return []
        key = self._keys.setdefault(event.api_key_id, _Key)
        findings: list[Finding] = []
        known = bool(key.countries)
        if known and here.country not in key.countries and config.new_country is not None:
            findings.append(self._new_country(event, key, here, config.new_country))
        if key.last is not None and config.impossible_travel is not None:
            found = self._travel(event, key.last, here, config, config.impossible_travel)
            if found is not None:
                findings.append(found)
        key.countries[here.country] = None
        key.countries.move_to_end(here.country)
        while len(key.countries) > config.max_countries:
            key.countries.popitem(last=False)
        if key.last is None or event.time_us >= key.last[0]:
            key.last = (event.time_us, here, event.source_ip, event.sequence)
        return findings

    def _new_country(self, event: AuditEvent, key: _Key, here: Location, rule: Rule) -> Finding:
        self.alerts[NEW_COUNTRY] += 1
        return finding(
            NEW_COUNTRY,
            rule,
            event,
            subject_kind="api_key",
            subject=event.api_key_id,
            window_us=event.time_us,
            summary=f"API key {event.api_key_id} used from {here.country} for the first time",
            evidence={
                "country": here.country,
                "source_ip": event.source_ip,
                "known_countries": ",".join(key.countries),
            },
            sequences=(event.sequence,),
        )

    def _travel(
        self,
        event: AuditEvent,
        last: tuple[int, Location, str, int],
        here: Location,
        config: GeoConfig,
        rule: Rule,
    ) -> Finding | None:
        then, there, address, sequence = last
        if there.country == here.country:
            return None
        distance = distance_km(there, here)
        if math.isnan(distance):
            return None  # a country without coordinates: not judged
        effective = distance - config.slack_km
        if effective <= 0:
            return None
        hours = abs(event.time_us - then) / 3_600_000_000
        if effective <= config.max_speed_kmh * hours:
            return None
        speed = effective / hours if hours > 0 else math.inf
        self.alerts[IMPOSSIBLE_TRAVEL] += 1
        return finding(
            IMPOSSIBLE_TRAVEL,
            rule,
            event,
            subject_kind="api_key",
            subject=event.api_key_id,
            window_us=event.time_us,
            summary=(
                f"API key {event.api_key_id} used from {there.country} then {here.country} "
                f"({distance:.0f} km in {hours * 3600:.0f} s)"
            ),
            evidence={
                "from_country": there.country,
                "from_ip": address,
                "to_country": here.country,
                "to_ip": event.source_ip,
                "distance_km": f"{distance:.0f}",
                "seconds": f"{hours * 3600:.3f}",
                "speed_kmh": "inf" if math.isinf(speed) else f"{speed:.0f}",
                "max_speed_kmh": f"{config.max_speed_kmh:g}",
            },
            sequences=(sequence, event.sequence),
        )
