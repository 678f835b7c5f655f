"""SQLite monitor store (the embedded default): the `MonitorStore` contract (services/monitor/store.py) on one file,
through the kit's `SqliteWorker` (WAL, synchronous=FULL, owner-only, migrations). `commit` is one BEGIN IMMEDIATE
transaction: INSERT OR IGNORE of the alerts (their actions inserted only for the alerts that were new) and the
position's update."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.monitor.model import ActionRecord, ActionStatus, Alert, AlertFilter, AlertState
from services.monitor.store import (
    ALERT_COLUMNS,
    MAX_PAGE,
    action_rows,
    alert_from_row,
    alert_row,
    filter_conditions,
    page_token,
    parse_token,
)
from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker

__all__ = ["MIGRATIONS", "SqliteMonitorStore"]

# Append-only: a released migration is never edited (see tradeguard.storage.migrations).
MIGRATIONS = (
    Migration(
        1,
        "position, alerts, actions",
        (
            """CREATE TABLE IF NOT EXISTS position (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                next_sequence INTEGER NOT NULL CHECK (next_sequence >= 0),
                record_time_us INTEGER NOT NULL
            ) STRICT""",
            "INSERT OR IGNORE INTO position (id, next_sequence, record_time_us) VALUES (1, 0, 0)",
            """CREATE TABLE IF NOT EXISTS alerts (
                alert_id TEXT PRIMARY KEY,
                detector TEXT NOT NULL,
                severity INTEGER NOT NULL,
                subject_kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                window_us INTEGER NOT NULL,
                summary TEXT NOT NULL,
                event_time_us INTEGER NOT NULL,
                evidence TEXT NOT NULL,
                sequences TEXT NOT NULL,
                account_id TEXT NOT NULL,
                api_key_id TEXT NOT NULL,
                kill_scope TEXT NOT NULL,
                raised_us INTEGER NOT NULL,
                state INTEGER NOT NULL,
                acknowledged_by TEXT NOT NULL,
                note TEXT NOT NULL,
                acknowledged_us INTEGER NOT NULL
            ) STRICT""",
            "CREATE INDEX IF NOT EXISTS alerts_raised ON alerts (raised_us DESC, alert_id DESC)",
            """CREATE TABLE IF NOT EXISTS actions (
                alert_id TEXT NOT NULL REFERENCES alerts (alert_id),
                kind INTEGER NOT NULL,
                target TEXT NOT NULL,
                status INTEGER NOT NULL,
                detail TEXT NOT NULL,
                time_us INTEGER NOT NULL,
                PRIMARY KEY (alert_id, kind)
            ) STRICT""",
            "CREATE INDEX IF NOT EXISTS actions_pending ON actions (status, alert_id)",
        ),
    ),
)

_ACTIONS = "SELECT kind, target, status, detail, time_us FROM actions WHERE alert_id = ? ORDER BY kind"


def _load(conn: sqlite3.Connection, row: Sequence[Any]) -> Alert:
    return alert_from_row(row, conn.execute(_ACTIONS, (row[0],)).fetchall())


def _get(conn: sqlite3.Connection, alert_id: str) -> Alert | None:
    row = conn.execute(f"SELECT {ALERT_COLUMNS} FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()  # noqa: S608
    return None if row is None else _load(conn, row)


class SqliteMonitorStore:
    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    @classmethod
    async def open(cls, path: Path) -> SqliteMonitorStore:
        return cls(await SqliteWorker.open(path, MIGRATIONS, name="sqlite-monitor"))

    async def position(self) -> tuple[int, int]:
        def read(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute("SELECT next_sequence, record_time_us FROM position WHERE id = 1").fetchone()
            return int(row[0]), int(row[1])

        return await self._worker.run(read)

    async def commit(self, position: int, record_time_us: int, alerts: Sequence[Alert]) -> list[Alert]:
        def write(conn: sqlite3.Connection) -> list[Alert]:
            created: list[Alert] = []
            for alert in alerts:
                cursor = conn.execute(
                    f"INSERT OR IGNORE INTO alerts ({ALERT_COLUMNS}) VALUES ({', '.join('?' * 18)})",  # noqa: S608
                    alert_row(alert),
                )
                if cursor.rowcount == 1:
                    conn.executemany("INSERT INTO actions VALUES (?, ?, ?, ?, ?, ?)", action_rows(alert))
                    created.append(alert)
            conn.execute(
                "UPDATE position SET next_sequence = ?, record_time_us = ? WHERE id = 1 AND next_sequence <= ?",
                (position, record_time_us, position),
            )
            return created

        return await self._worker.transaction(write)

    async def pending(self) -> list[Alert]:
        def read(conn: sqlite3.Connection) -> list[Alert]:
            ids = conn.execute(
                "SELECT DISTINCT alert_id FROM actions WHERE status = ? ORDER BY alert_id",
                (int(ActionStatus.PENDING),),
            ).fetchall()
            return [alert for (alert_id,) in ids if (alert := _get(conn, alert_id)) is not None]

        return await self._worker.run(read)

    async def finish(self, alert_id: str, action: ActionRecord) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE actions SET target = ?, status = ?, detail = ?, time_us = ? "
                "WHERE alert_id = ? AND kind = ? AND status = ?",
                (
                    action.target,
                    int(action.status),
                    action.detail,
                    action.time_us,
                    alert_id,
                    int(action.kind),
                    int(ActionStatus.PENDING),
                ),
            )

        await self._worker.transaction(write)

    async def get(self, alert_id: str) -> Alert | None:
        return await self._worker.run(lambda conn: _get(conn, alert_id))

    async def acknowledge(self, alert_id: str, by: str, note: str, time_us: int) -> Alert | None:
        def write(conn: sqlite3.Connection) -> Alert | None:
            conn.execute(
                "UPDATE alerts SET state = ?, acknowledged_by = ?, note = ?, acknowledged_us = ? "
                "WHERE alert_id = ? AND state = ?",
                (int(AlertState.ACKNOWLEDGED), by, note, time_us, alert_id, int(AlertState.OPEN)),
            )
            return _get(conn, alert_id)

        return await self._worker.transaction(write)

    async def list(self, query: AlertFilter, page_size: int, page_token_in: str) -> tuple[list[Alert], str]:
        after = parse_token(page_token_in)
        conditions, params = filter_conditions(query, "?")
        if after is not None:
            conditions.append("(raised_us < ? OR (raised_us = ? AND alert_id < ?))")
            params += [after[0], after[0], after[1]]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        size = max(1, min(page_size, MAX_PAGE))

        def read(conn: sqlite3.Connection) -> list[Alert]:
            rows = conn.execute(
                f"SELECT {ALERT_COLUMNS} FROM alerts {where} "  # noqa: S608 (conditions are constants)
                "ORDER BY raised_us DESC, alert_id DESC LIMIT ?",
                (*params, size + 1),
            ).fetchall()
            return [_load(conn, row) for row in rows]

        alerts = await self._worker.run(read)
        more = len(alerts) > size
        alerts = alerts[:size]
        return alerts, page_token(alerts[-1]) if more else ""

    async def open_alerts(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM alerts WHERE state = ?", (int(AlertState.OPEN),)
            ).fetchone()
            return int(row[0])

        return await self._worker.run(read)

    async def close(self) -> None:
        await self._worker.close()
