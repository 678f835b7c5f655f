"""Fixtures and builders for the monitor tests.

- `event(sequence, seconds, **fields)`: an `AuditEvent` at `START_US + seconds` (event and record time), outcome
  OK unless given; `locations`: a fake `Locate` over a few documentation addresses (TEST-NET ranges play
  countries: "GB", "FR", "JP", "AU", "US"); `PRIVATE`: an address that is located nowhere.
- `monitor_db` / `monitor_store`: a `MonitorStore` on SQLite (a file in tmp_path) or PostgreSQL (a fresh schema on
  the machine's server, dropped after the test; skipped when unreachable, failed when TRADEGUARD_TEST_PG_DSN is
  set). `monitor_db.open()` opens the same database again (a restart).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest

from services.monitor.core.geography import Location
from services.monitor.model import AuditEvent, Outcome
from services.monitor.store import MonitorStore
from services.monitor.store_postgres import PostgresMonitorStore
from services.monitor.store_sqlite import SqliteMonitorStore
from tests.support import PG_DSN, Database, open_database

START_US: Final = 1_800_000_000_000_000
PRIVATE: Final = "10.0.0.1"
ADDRESSES: Final = {
    "192.0.2.1": Location("GB", 55.4, -3.4),
    "192.0.2.2": Location("GB", 55.4, -3.4),
    "198.51.100.1": Location("FR", 46.2, 2.2),
    "203.0.113.1": Location("JP", 36.2, 138.3),
    "203.0.113.2": Location("AU", -25.3, 133.8),
    "203.0.113.3": Location("US", 39.8, -98.6),
}


def locate(ip: str) -> Location | None:
    return ADDRESSES.get(ip)


def event(sequence: int, seconds: float, outcome: Outcome = Outcome.OK, **fields: Any) -> AuditEvent:
    time_us = START_US + round(seconds * 1_000_000)
    return AuditEvent(sequence=sequence, time_us=time_us, record_time_us=time_us, outcome=outcome, **fields)


class MonitorDatabase(Database):
    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "monitor.sqlite3", "tg_test_monitor")

    async def open(self) -> MonitorStore:
        if self.kind == "sqlite":
            return self.opened(await SqliteMonitorStore.open(self.path))
        return self.opened(await PostgresMonitorStore.open(PG_DSN, schema=self.schema))


@pytest.fixture(params=["sqlite", "postgres"])
async def monitor_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MonitorDatabase]:
    async with open_database(MonitorDatabase, request.param, tmp_path) as database:
        yield database


@pytest.fixture
async def monitor_store(monitor_db: MonitorDatabase) -> MonitorStore:
    return await monitor_db.open()
