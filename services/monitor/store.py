"""The monitor's store: where it is in the audit log, the alerts it raised and the actions it took. A
`typing.Protocol` with two backends (store_sqlite.py, the embedded default; store_postgres.py), one contract test
run against each (tests/services/monitor/test_store.py).

The contract:
- `commit(position, record_time_us, alerts)` is ONE transaction: the alerts whose ids are new are inserted with
  their actions (each PENDING: an outbox), alerts whose ids exist are left as they are (a restart reading the same
  events again raises nothing twice), and the position (the next sequence to read) is set — all or nothing. It
  answers the alerts it inserted. A position never moves backwards (a smaller one is ignored).
- `pending()`: the alerts with an action still PENDING (carried out after a crash between the commit and the
  action: an action is never lost; it may run twice only if the crash came during it, and every action is
  idempotent: revoking a revoked key, engaging an engaged switch, a webhook carrying the alert id).
- `finish(alert_id, action)`: the action's outcome (compare-and-set: only a PENDING action changes).
- `acknowledge(alert_id, by, note, time_us)`: the alert acknowledged (an acknowledged one keeps its first
  acknowledgement); None for an unknown id.
- `list(filter, page_size, page_token)`: newest first (raised time, then id), a page and the next page's token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from services.monitor.model import (
    ActionKind,
    ActionRecord,
    ActionStatus,
    Alert,
    AlertFilter,
    AlertState,
    Finding,
    Severity,
)

__all__ = [
    "ALERT_COLUMNS",
    "MAX_PAGE",
    "MonitorStore",
    "action_rows",
    "alert_from_row",
    "alert_row",
    "filter_conditions",
    "page_token",
    "parse_token",
]

MAX_PAGE = 1000


class MonitorStore(Protocol):
    async def position(self) -> tuple[int, int]: ...

    async def commit(self, position: int, record_time_us: int, alerts: Sequence[Alert]) -> list[Alert]: ...

    async def pending(self) -> list[Alert]: ...

    async def finish(self, alert_id: str, action: ActionRecord) -> None: ...

    async def get(self, alert_id: str) -> Alert | None: ...

    async def acknowledge(self, alert_id: str, by: str, note: str, time_us: int) -> Alert | None: ...

    async def list(self, query: AlertFilter, page_size: int, page_token: str) -> tuple[list[Alert], str]: ...

    async def open_alerts(self) -> int: ...

    async def close(self) -> None: ...


ALERT_COLUMNS = (
    "alert_id, detector, severity, subject_kind, subject, window_us, summary, event_time_us, evidence, "
    "sequences, account_id, api_key_id, kill_scope, raised_us, state, acknowledged_by, note, acknowledged_us"
)


def alert_row(alert: Alert) -> tuple[Any, ...]:
    """The alerts row of `alert` (ALERT_COLUMNS' order)."""
    f = alert.finding
    return (
        alert.alert_id,
        f.detector,
        int(f.severity),
        f.subject_kind,
        f.subject,
        f.window_us,
        f.summary,
        f.event_time_us,
        json.dumps(dict(f.evidence), sort_keys=True),
        json.dumps(list(f.sequences)),
        f.account_id,
        f.api_key_id,
        f.kill_scope,
        alert.raised_us,
        int(alert.state),
        alert.acknowledged_by,
        alert.note,
        alert.acknowledged_us,
    )


def action_rows(alert: Alert) -> list[tuple[Any, ...]]:
    return [
        (alert.alert_id, int(a.kind), a.target, int(a.status), a.detail, a.time_us) for a in alert.actions
    ]


def alert_from_row(row: Sequence[Any], actions: Sequence[Sequence[Any]]) -> Alert:
    """An alert from its row (ALERT_COLUMNS' order) and its actions' rows (kind, target, status, detail, time)."""
    evidence: Mapping[str, str] = json.loads(row[8])
    finding = Finding(
        detector=row[1],
        severity=Severity(row[2]),
        subject_kind=row[3],
        subject=row[4],
        window_us=row[5],
        summary=row[6],
        event_time_us=row[7],
        evidence=evidence,
        sequences=tuple(json.loads(row[9])),
        account_id=row[10],
        api_key_id=row[11],
        actions=tuple(ActionKind(a[0]) for a in actions),
        kill_scope=row[12],
    )
    return Alert(
        alert_id=row[0],
        finding=finding,
        raised_us=row[13],
        state=AlertState(row[14]),
        acknowledged_by=row[15],
        note=row[16],
        acknowledged_us=row[17],
        actions=tuple(ActionRecord(ActionKind(a[0]), a[1], ActionStatus(a[2]), a[3], a[4]) for a in actions),
    )


def page_token(alert: Alert) -> str:
    return f"{alert.raised_us}.{alert.alert_id}"


def parse_token(token: str) -> tuple[int, str] | None:
    """(raised time, id) of a page token; None for an empty one; ValueError for a malformed one."""
    if not token:
        return None
    raised, _, alert_id = token.partition(".")
    if not raised.isdigit() or not alert_id:
        raise ValueError("malformed page token")
    return int(raised), alert_id


def filter_conditions(query: AlertFilter, mark: str) -> tuple[list[str], list[Any]]:
    """SQL conditions and parameters of a filter (`mark`: the driver's placeholder, ? or %s)."""
    conditions: list[str] = []
    params: list[Any] = []
    if query.detector:
        conditions.append(f"detector = {mark}")
        params.append(query.detector)
    if query.state is not None:
        conditions.append(f"state = {mark}")
        params.append(int(query.state))
    if query.min_severity is not None:
        conditions.append(f"severity >= {mark}")
        params.append(int(query.min_severity))
    if query.subject:
        conditions.append(f"subject = {mark}")
        params.append(query.subject)
    if query.since_us:
        conditions.append(f"raised_us >= {mark}")
        params.append(query.since_us)
    return conditions, params
