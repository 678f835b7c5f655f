"""The engine with a real store (SQLite and PostgreSQL) and a recording actuator: an alert raised, stored with the
position in one commit, published, its actions carried out and recorded; a restart reading the same events again
neither raises nor acts twice; a crash between the commit and an action leaves it pending and the restart carries
it out once (the outbox); budgets suppress an action storm; an archived gap moves the position with an alert."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from decimal import Decimal

from services.monitor.core.config import BurstConfig, MonitorConfig, RateConfig, Rule
from services.monitor.core.engine import AUDIT_GAP, Detectors, Monitor
from services.monitor.model import (
    ActionKind,
    ActionRecord,
    ActionStatus,
    Alert,
    AuditEvent,
    Outcome,
    Severity,
)
from tests.services.monitor.conftest import MonitorDatabase, event, locate
from tradeguard.testing import FakeClock, eventually

DENIED = Outcome.DENIED_AUTHENTICATION


def config(revokes_per_minute: int = 20) -> MonitorConfig:
    rule = Rule(3, Severity.CRITICAL, (ActionKind.NOTIFY, ActionKind.REVOKE_KEY))
    return MonitorConfig(
        budgets={
            ActionKind.NOTIFY: 1000,
            ActionKind.REVOKE_KEY: revokes_per_minute,
            ActionKind.KILL_SWITCH: 1,
        },
        auth_failures=BurstConfig(True, 60_000_000, 1000, {"api_key": rule}),
    )


@dataclass
class Recording:
    """An actuator that remembers what it was asked (and may be told to hang on revocations)."""

    acted: list[tuple[str, ActionKind, str]] = field(default_factory=list)
    recorded: list[tuple[str, ActionKind, ActionStatus]] = field(default_factory=list)
    hang: asyncio.Event | None = None
    started: list[ActionKind] = field(default_factory=list)  # asked, whether or not it finished

    async def act(self, alert: Alert, action: ActionRecord) -> tuple[ActionStatus, str]:
        self.started.append(action.kind)
        if self.hang is not None and action.kind is ActionKind.REVOKE_KEY:
            await self.hang.wait()
        self.acted.append((alert.alert_id, action.kind, action.target))
        return ActionStatus.DONE, ""

    async def record(self, alert: Alert, action: ActionRecord) -> bool:
        self.recorded.append((alert.alert_id, action.kind, action.status))
        return True


def burst(key: str, first_sequence: int = 0, count: int = 3) -> list[AuditEvent]:
    return [
        event(
            first_sequence + i,
            first_sequence + i * 0.5,
            DENIED,
            api_key_id=key,
            account_id="acct-1",
            recorder="spiffe://t/svc/trading",
        )
        for i in range(count)
    ]


async def engine(db: MonitorDatabase, actuator: Recording, cfg: MonitorConfig | None = None) -> Monitor:
    monitor = Monitor(await db.open(), Detectors(lambda: cfg or config(), locate), actuator, FakeClock())
    await monitor.open()
    return monitor


async def test_an_alert_is_stored_published_acted_on_and_recorded(monitor_db: MonitorDatabase) -> None:
    actuator = Recording()
    monitor = await engine(monitor_db, actuator)
    queue = monitor.watchers.subscribe()
    raised = await monitor.process(burst("k1"))
    assert len(raised) == 1
    alert = raised[0]
    assert queue.get_nowait() == alert
    assert actuator.acted == [
        (alert.alert_id, ActionKind.NOTIFY, "api_key:k1"),
        (alert.alert_id, ActionKind.REVOKE_KEY, "k1"),
    ]
    assert actuator.recorded == [
        (alert.alert_id, ActionKind.NOTIFY, ActionStatus.DONE),
        (alert.alert_id, ActionKind.REVOKE_KEY, ActionStatus.DONE),
    ]
    stored = await monitor.store.get(alert.alert_id)
    assert stored is not None and [a.status for a in stored.actions] == [ActionStatus.DONE] * 2
    assert await monitor.store.position() == (3, burst("k1")[-1].record_time_us)
    assert monitor.position == 3 and monitor.actions_done == 2


async def test_a_restart_reading_the_same_events_neither_raises_nor_acts_twice(
    monitor_db: MonitorDatabase,
) -> None:
    actuator = Recording()
    first = await engine(monitor_db, actuator)
    before = (
        burst("k1") + burst("k2", 3) + burst("k3", 6, count=2)
    )  # k3: 2 of its 3 failures before the crash
    assert len(await first.process(before)) == 2
    acted = list(actuator.acted)
    again = await engine(monitor_db, actuator)  # the restart: position 8, the tail replays from before it
    assert again.position == 8
    assert (
        await again.process(before) == []
    )  # the replay: the detectors warm up, nothing raised or done again
    assert actuator.acted == acted
    after = burst("k3", 8, count=1)  # k3's third failure, after the restart: the straddling burst is caught
    raised = await again.process(after)
    assert [(a.finding.subject, a.finding.sequences) for a in raised] == [("k3", (6, 7, 8))]
    revoked = [target for _, kind, target in actuator.acted if kind is ActionKind.REVOKE_KEY]
    assert revoked == ["k1", "k2", "k3"]  # each once


async def test_a_crash_before_an_action_leaves_it_pending_and_the_restart_does_it_once(
    monitor_db: MonitorDatabase,
) -> None:
    hanging = Recording(hang=asyncio.Event())
    first = await engine(monitor_db, hanging)
    task = asyncio.create_task(first.process(burst("k1")))
    # the notification went and was stored done (the engine acts one action after the other); the revocation hangs
    await eventually(lambda: ActionKind.REVOKE_KEY in hanging.started)
    task.cancel()  # the crash
    await asyncio.gather(task, return_exceptions=True)
    assert [kind for _, kind, _ in hanging.acted] == [ActionKind.NOTIFY]
    pending = await first.store.pending()
    assert len(pending) == 1 and [a.status for a in pending[0].actions] == [
        ActionStatus.DONE,
        ActionStatus.PENDING,
    ]
    actuator = Recording()
    restarted = await engine(monitor_db, actuator)  # open() carries out the outbox
    assert actuator.acted == [(pending[0].alert_id, ActionKind.REVOKE_KEY, "k1")]
    assert await restarted.store.pending() == []
    await restarted.process(burst("k1"))  # the same events again: nothing more
    assert len(actuator.acted) == 1


async def test_budgets_stop_an_action_storm(monitor_db: MonitorDatabase) -> None:
    actuator = Recording()
    monitor = await engine(monitor_db, actuator, config(revokes_per_minute=2))
    events = [e for i in range(10) for e in burst(f"k{i}", 3 * i)]
    raised = await monitor.process(events)
    assert len(raised) == 10  # every alert stands
    revoked = [target for _, kind, target in actuator.acted if kind is ActionKind.REVOKE_KEY]
    assert len(revoked) == 2 and monitor.actions_suppressed == 8
    statuses = [s for _, kind, s in actuator.recorded if kind is ActionKind.REVOKE_KEY]
    assert statuses.count(ActionStatus.SUPPRESSED) == 8  # recorded too


async def test_excluded_recorders_are_not_read(monitor_db: MonitorDatabase) -> None:
    actuator = Recording()
    monitor = await engine(monitor_db, actuator)
    own = [event(i, i, DENIED, api_key_id="k1", recorder="spiffe://t/svc/monitor") for i in range(10)]
    assert await monitor.process(own) == []
    assert monitor.position == 10


async def test_an_archived_gap_moves_the_position_with_a_critical_alert(monitor_db: MonitorDatabase) -> None:
    actuator = Recording()
    monitor = await engine(monitor_db, actuator)
    raised = await monitor.gap(0, 500)
    assert [(a.finding.detector, a.finding.severity) for a in raised] == [(AUDIT_GAP, Severity.CRITICAL)]
    assert raised[0].finding.evidence == {"first_missed": "0", "first_available": "500"}
    assert monitor.position == 500 and (await monitor.store.position())[0] == 500


async def test_a_reloaded_configuration_takes_effect_on_the_next_batch(monitor_db: MonitorDatabase) -> None:
    current = {"config": config()}  # threshold 3
    actuator = Recording()
    monitor = Monitor(
        await monitor_db.open(), Detectors(lambda: current["config"], locate), actuator, FakeClock()
    )
    await monitor.open()
    assert await monitor.process(burst("k1", 0, count=2)) == []
    stricter = Rule(2, Severity.WARNING, (ActionKind.NOTIFY,))
    current["config"] = MonitorConfig(
        auth_failures=BurstConfig(True, 60_000_000, 1000, {"api_key": stricter})
    )
    raised = await monitor.process(
        burst("k2", 2, count=2)
    )  # the memory of k1 kept, the new threshold in force
    assert [(a.finding.subject, a.finding.severity) for a in raised] == [("k2", Severity.WARNING)]
    assert [kind for _, kind, _ in actuator.acted] == [ActionKind.NOTIFY]  # no revocation in the new policy


def placed(sequence: int, seconds: float, quantity: str, price: str) -> AuditEvent:
    return event(
        sequence,
        seconds,
        api_key_id="k-orders",
        account_id="acct-7",
        recorder="spiffe://t/svc/trading",
        method="/tradeguard.trading.v1.TradingService/PlaceOrder",
        details={"symbol": "EQ01", "side": "SIDE_BUY", "quantity": quantity, "price": price},
    )


async def test_an_order_notional_spike_engages_the_kill_switch_at_the_account_s_scope(
    monitor_db: MonitorDatabase,
) -> None:
    kill = Rule(
        severity=Severity.CRITICAL,
        actions=(ActionKind.NOTIFY, ActionKind.KILL_SWITCH),
        kill_scope="account",
        amount=Decimal(10_000),
    )
    orders = RateConfig(True, 10_000_000, 0.1, 10, 8.0, 1000, {"api_key": kill})
    current = {"config": replace(config(), order_notional=orders)}
    actuator = Recording()
    monitor = Monitor(
        await monitor_db.open(), Detectors(lambda: current["config"], locate), actuator, FakeClock()
    )
    await monitor.open()
    normal = [placed(i, i * 10 + 1, "10", "50.25") for i in range(20)]  # one order of 502.5 per 10 s
    assert await monitor.process(normal) == []
    # a reload (volume on too) keeps the notional baseline: no new warm-up
    current["config"] = replace(current["config"], order_volume=replace(orders, subjects={}))
    raised = await monitor.process([placed(20, 201, "1000", "50.25")])  # 50,250 in one order
    assert [(a.finding.detector, a.finding.subject) for a in raised] == [("order_notional", "k-orders")]
    assert raised[0].finding.evidence["notional"] == "50250.00"
    assert actuator.acted == [
        (raised[0].alert_id, ActionKind.NOTIFY, "api_key:k-orders"),
        (raised[0].alert_id, ActionKind.KILL_SWITCH, "account:acct-7"),
    ]
    counts = {c.name: (c.enabled, c.alerts) for c in monitor.detectors.counts()}
    assert counts["order_notional"] == (True, 1) and counts["order_volume"] == (True, 0)
