"""PostgreSQL monitor store: the `MonitorStore` contract (services/monitor/store.py) in a schema of its own
("tg_monitor"), on the kit's pool (autocommit connections; `commit` opens ONE transaction: INSERT ... ON CONFLICT
DO NOTHING of the alerts, their actions for the new ones, and the position's update under a row lock)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, LiteralString

from psycopg import sql

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
from tradeguard.storage.postgres import Conn, Pool, open_pool

__all__ = ["DEFAULT_SCHEMA", "MIGRATIONS", "PostgresMonitorStore"]

DEFAULT_SCHEMA = "tg_monitor"

# Append-only: a released migration is never edited (see tradeguard.storage.migrations).
MIGRATIONS = (
    Migration(
        1,
        "position, alerts, actions",
        (
            """CREATE TABLE IF NOT EXISTS {schema}.position (
                id integer PRIMARY KEY CHECK (id = 1),
                next_sequence bigint NOT NULL CHECK (next_sequence >= 0),
                record_time_us bigint NOT NULL
            )""",
            "INSERT INTO {schema}.position VALUES (1, 0, 0) ON CONFLICT DO NOTHING",
            """CREATE TABLE IF NOT EXISTS {schema}.alerts (
                alert_id text PRIMARY KEY,
                detector text NOT NULL,
                severity integer NOT NULL,
                subject_kind text NOT NULL,
                subject text NOT NULL,
                window_us bigint NOT NULL,
                summary text NOT NULL,
                event_time_us bigint NOT NULL,
                evidence text NOT NULL,
                sequences text NOT NULL,
                account_id text NOT NULL,
                api_key_id text NOT NULL,
                kill_scope text NOT NULL,
                raised_us bigint NOT NULL,
                state integer NOT NULL,
                acknowledged_by text NOT NULL,
                note text NOT NULL,
                acknowledged_us bigint NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS alerts_raised ON {schema}.alerts (raised_us DESC, alert_id DESC)",
            """CREATE TABLE IF NOT EXISTS {schema}.actions (
                alert_id text NOT NULL REFERENCES {schema}.alerts (alert_id),
                kind integer NOT NULL,
                target text NOT NULL,
                status integer NOT NULL,
                detail text NOT NULL,
                time_us bigint NOT NULL,
                PRIMARY KEY (alert_id, kind)
            )""",
            "CREATE INDEX IF NOT EXISTS actions_pending ON {schema}.actions (status, alert_id)",
        ),
    ),
)


class PostgresMonitorStore:
    def __init__(self, pool: Pool, schema: str) -> None:
        self._pool = pool
        self._schema = sql.Identifier(schema)

    @classmethod
    async def open(cls, dsn: str, *, schema: str = DEFAULT_SCHEMA) -> PostgresMonitorStore:
        return cls(await open_pool(dsn, schema, MIGRATIONS, max_size=4), schema)

    def _q(self, text: LiteralString) -> sql.Composed:
        return sql.SQL(text).format(schema=self._schema)

    async def _get(self, conn: Conn, alert_id: str) -> Alert | None:
        cur = await conn.execute(
            self._q(f"SELECT {ALERT_COLUMNS} FROM {{schema}}.alerts WHERE alert_id = %s"),  # noqa: S608
            (alert_id,),
        )
        row = await cur.fetchone()
        return None if row is None else await self._load(conn, row)

    async def _load(self, conn: Conn, row: Sequence[Any]) -> Alert:
        cur = await conn.execute(
            self._q(
                "SELECT kind, target, status, detail, time_us FROM {schema}.actions WHERE alert_id = %s ORDER BY kind"
            ),
            (row[0],),
        )
        return alert_from_row(row, await cur.fetchall())

    async def position(self) -> tuple[int, int]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._q("SELECT next_sequence, record_time_us FROM {schema}.position"))
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def commit(self, position: int, record_time_us: int, alerts: Sequence[Alert]) -> list[Alert]:
        insert = self._q(
            f"INSERT INTO {{schema}}.alerts ({ALERT_COLUMNS}) VALUES ({', '.join(['%s'] * 18)}) "  # noqa: S608
            "ON CONFLICT (alert_id) DO NOTHING"
        )
        created: list[Alert] = []
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self._q("SELECT 1 FROM {schema}.position WHERE id = 1 FOR UPDATE"))
            for alert in alerts:
                cur = await conn.execute(insert, alert_row(alert))
                if cur.rowcount == 1:
                    async with conn.cursor() as actions:
                        await actions.executemany(
                            self._q("INSERT INTO {schema}.actions VALUES (%s, %s, %s, %s, %s, %s)"),
                            action_rows(alert),
                        )
                    created.append(alert)
            await conn.execute(
                self._q(
                    "UPDATE {schema}.position SET next_sequence = %s, record_time_us = %s "
                    "WHERE id = 1 AND next_sequence <= %s"
                ),
                (position, record_time_us, position),
            )
        return created

    async def pending(self) -> list[Alert]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                self._q("SELECT DISTINCT alert_id FROM {schema}.actions WHERE status = %s ORDER BY alert_id"),
                (int(ActionStatus.PENDING),),
            )
            ids = await cur.fetchall()
            return [alert for (alert_id,) in ids if (alert := await self._get(conn, alert_id)) is not None]

    async def finish(self, alert_id: str, action: ActionRecord) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                self._q(
                    "UPDATE {schema}.actions SET target = %s, status = %s, detail = %s, time_us = %s "
                    "WHERE alert_id = %s AND kind = %s AND status = %s"
                ),
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

    async def get(self, alert_id: str) -> Alert | None:
        async with self._pool.connection() as conn:
            return await self._get(conn, alert_id)

    async def acknowledge(self, alert_id: str, by: str, note: str, time_us: int) -> Alert | None:
        async with self._pool.connection() as conn:
            await conn.execute(
                self._q(
                    "UPDATE {schema}.alerts SET state = %s, acknowledged_by = %s, note = %s, acknowledged_us = %s "
                    "WHERE alert_id = %s AND state = %s"
                ),
                (int(AlertState.ACKNOWLEDGED), by, note, time_us, alert_id, int(AlertState.OPEN)),
            )
            return await self._get(conn, alert_id)

    async def list(self, query: AlertFilter, page_size: int, page_token_in: str) -> tuple[list[Alert], str]:
        after = parse_token(page_token_in)
        conditions, params = filter_conditions(query, "%s")
        if after is not None:
            conditions.append("(raised_us < %s OR (raised_us = %s AND alert_id < %s))")
            params += [after[0], after[0], after[1]]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        size = max(1, min(page_size, MAX_PAGE))
        text = (
            f"SELECT {ALERT_COLUMNS} FROM {{schema}}.alerts {where} "  # noqa: S608 (constants)
            "ORDER BY raised_us DESC, alert_id DESC LIMIT %s"
        )
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._q(text), (*params, size + 1))
            alerts = [await self._load(conn, row) for row in await cur.fetchall()]
        more = len(alerts) > size
        alerts = alerts[:size]
        return alerts, page_token(alerts[-1]) if more else ""

    async def open_alerts(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                self._q("SELECT count(*) FROM {schema}.alerts WHERE state = %s"), (int(AlertState.OPEN),)
            )
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    async def close(self) -> None:
        await self._pool.close()
