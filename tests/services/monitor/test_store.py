"""The store contract on SQLite and PostgreSQL (real): a commit stores new alerts with their pending actions and
the position in one go, an alert id stored before is not stored again (nor its actions), the position never
goes back, finishing an action is compare-and-set, acknowledgement keeps the first one, listing is newest first
with filters and pages, and everything survives a reopen."""

from __future__ import annotations

import pytest

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
from services.monitor.store import MonitorStore
from tests.services.monitor.conftest import MonitorDatabase


def alert(
    subject: str, raised_us: int, detector: str = "auth_failures", severity: Severity = Severity.WARNING
) -> Alert:
    finding = Finding(
        detector=detector,
        severity=severity,
        subject_kind="api_key",
        subject=subject,
        window_us=1000,
        summary=f"{subject}: 10 failed authentications within 60 s",
        event_time_us=raised_us - 5,
        evidence={"count": "10", "cause": "bad signature"},
        sequences=(3, 4, 5),
        account_id="acct-1",
        api_key_id=subject,
        actions=(ActionKind.NOTIFY, ActionKind.REVOKE_KEY),
    )
    return Alert(
        alert_id=finding.alert_id,
        finding=finding,
        raised_us=raised_us,
        actions=(
            ActionRecord(ActionKind.NOTIFY, f"api_key:{subject}", ActionStatus.PENDING),
            ActionRecord(ActionKind.REVOKE_KEY, subject, ActionStatus.PENDING),
        ),
    )


async def test_a_commit_stores_alerts_actions_and_position_once(monitor_db: MonitorDatabase) -> None:
    store = await monitor_db.open()
    assert await store.position() == (0, 0)
    first = alert("k1", 100)
    assert await store.commit(10, 555, [first]) == [first]
    assert await store.position() == (10, 555)
    assert await store.get(first.alert_id) == first  # every field round-trips
    # the same alert again (a restart re-reading the events): not stored twice, the position moves on
    assert await store.commit(20, 666, [first, alert("k2", 101)]) == [alert("k2", 101)]
    assert await store.position() == (20, 666)
    assert [a.alert_id for a in await store.pending()] == sorted([first.alert_id, alert("k2", 101).alert_id])
    # a position never moves back
    await store.commit(15, 1, [])
    assert await store.position() == (20, 666)
    reopened = await monitor_db.open()
    assert await reopened.position() == (20, 666) and await reopened.get(first.alert_id) == first


async def test_finishing_an_action_is_compare_and_set(monitor_store: MonitorStore) -> None:
    stored = alert("k1", 100)
    await monitor_store.commit(1, 1, [stored])
    done = ActionRecord(ActionKind.REVOKE_KEY, "k1", ActionStatus.DONE, "", 200)
    await monitor_store.finish(stored.alert_id, done)
    await monitor_store.finish(
        stored.alert_id, ActionRecord(ActionKind.REVOKE_KEY, "k1", ActionStatus.FAILED, "late", 300)
    )
    reread = await monitor_store.get(stored.alert_id)
    assert reread is not None and reread.actions[1] == done
    assert [a.alert_id for a in await monitor_store.pending()] == [stored.alert_id]  # NOTIFY still pending
    await monitor_store.finish(
        stored.alert_id, ActionRecord(ActionKind.NOTIFY, "api_key:k1", ActionStatus.SUPPRESSED, "budget", 201)
    )
    assert await monitor_store.pending() == []


async def test_acknowledgement_keeps_the_first(monitor_store: MonitorStore) -> None:
    stored = alert("k1", 100)
    await monitor_store.commit(1, 1, [stored])
    assert await monitor_store.open_alerts() == 1
    acked = await monitor_store.acknowledge(stored.alert_id, "spiffe://t/svc/ops", "rotated the key", 500)
    assert acked is not None and acked.state is AlertState.ACKNOWLEDGED
    assert (acked.acknowledged_by, acked.note, acked.acknowledged_us) == (
        "spiffe://t/svc/ops",
        "rotated the key",
        500,
    )
    again = await monitor_store.acknowledge(stored.alert_id, "someone-else", "other", 600)
    assert again == acked
    assert await monitor_store.acknowledge("nope", "x", "", 1) is None
    assert await monitor_store.open_alerts() == 0


async def test_listing_is_newest_first_filtered_and_paged(monitor_store: MonitorStore) -> None:
    alerts = [
        alert(
            f"k{i}",
            1000 + i,
            "rate_spike" if i % 2 else "auth_failures",
            Severity.CRITICAL if i % 3 == 0 else Severity.WARNING,
        )
        for i in range(7)
    ]
    await monitor_store.commit(1, 1, alerts)
    seen: list[str] = []
    token = ""
    while True:
        page, token = await monitor_store.list(AlertFilter(), 3, token)
        seen += [a.finding.subject for a in page]
        if not token:
            break
    assert seen == [f"k{i}" for i in reversed(range(7))]
    spikes, _ = await monitor_store.list(AlertFilter(detector="rate_spike"), 100, "")
    assert [a.finding.subject for a in spikes] == ["k5", "k3", "k1"]
    critical, _ = await monitor_store.list(AlertFilter(min_severity=Severity.CRITICAL), 100, "")
    assert [a.finding.subject for a in critical] == ["k6", "k3", "k0"]
    recent, _ = await monitor_store.list(AlertFilter(since_us=1005, subject="k6"), 100, "")
    assert [a.finding.subject for a in recent] == ["k6"]
    await monitor_store.acknowledge(alerts[2].alert_id, "ops", "", 1)
    open_ones, _ = await monitor_store.list(AlertFilter(state=AlertState.OPEN), 100, "")
    assert "k2" not in [a.finding.subject for a in open_ones] and len(open_ones) == 6
    with pytest.raises(ValueError):
        await monitor_store.list(AlertFilter(), 10, "garbage")
