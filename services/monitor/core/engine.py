"""The monitor's engine: the detectors run over batches of audit events, the alerts stored with the position in
ONE transaction, then the actions carried out (an outbox), within the budgets.

`Detectors.detect(events)`: the configuration in force is read once per batch (`config()`: the hot-reloaded file;
a new one is passed to every detector, which keep their memories); entries recorded by an excluded workload (the
monitor's own) are skipped; each event goes through every detector in log order; findings with the same id in one
batch are kept once.

After a restart the tail replays the last entries before the stored position (services/monitor/tail.py,
`replay`) so that the detectors' windows and baselines are what they were: findings triggered by those entries are
dropped (their alerts were committed with them), so a burst that straddles the restart is still caught, and
nothing is raised twice.

`Monitor.process(events)`:
1. findings → alerts (raised now, each configured action PENDING, its target named: the key id, the kill switch's
   scope and value);
2. `store.commit(position, ...)`: the new alerts, their pending actions and the position, all or nothing. An alert
   whose id is already stored is not raised again (a restart re-reading events after a crash before the commit);
3. the new alerts are published to the watchers (WatchAlerts);
4. every pending action is carried out (`carry_out`): the budget of its kind taken (or SUPPRESSED), then the
   `Actuator` called (DONE, FAILED with its error, SKIPPED when not configured), the outcome stored and recorded in
   the audit log with its evidence (`Actuator.record`, idempotent by the alert id and the action's kind).
`open()` carries out the actions a crash left PENDING (the outbox) before the tail resumes. A crash after the
commit and before an action finishes leaves it PENDING: it runs after the restart, never lost; a crash DURING an
action may run it twice, which every action tolerates (see services/monitor/store.py).

`Monitor.gap(requested, first_available)`: the audit service archived entries the monitor had not read; the
position moves to the first available one and an `audit_gap` alert (critical) says which were skipped — in one
transaction, like a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from services.monitor.core.baseline import RateSpikes
from services.monitor.core.budget import Budget
from services.monitor.core.bursts import AUTH_FAILURES, PERMISSION_SCAN, RISK_REJECTIONS, Bursts
from services.monitor.core.config import MonitorConfig
from services.monitor.core.geography import IMPOSSIBLE_TRAVEL, NEW_COUNTRY, Geography, Locate
from services.monitor.core.orders import NOTIONAL, VOLUME, OrderSpikes
from services.monitor.model import (
    ActionKind,
    ActionRecord,
    ActionStatus,
    Alert,
    AuditEvent,
    Finding,
    Severity,
)
from services.monitor.store import MonitorStore

__all__ = ["AUDIT_GAP", "Actuator", "DetectorCount", "Detectors", "Monitor", "Watchers", "action_target"]

AUDIT_GAP = "audit_gap"


class Actuator(Protocol):
    """What carries out an action and records it (services/monitor/actions.py)."""

    async def act(self, alert: Alert, action: ActionRecord) -> tuple[ActionStatus, str]: ...

    async def record(self, alert: Alert, action: ActionRecord) -> bool: ...


@dataclass(frozen=True, slots=True)
class DetectorCount:
    name: str
    enabled: bool
    alerts: int
    tracked: int


def action_target(finding: Finding, kind: ActionKind) -> str:
    """What an action is carried out on: the key id (REVOKE_KEY), "<scope>:<value>" (KILL_SWITCH: the account or
    the key, per the rule's kill_scope), the subject (NOTIFY)."""
    if kind is ActionKind.REVOKE_KEY:
        return finding.api_key_id
    if kind is ActionKind.KILL_SWITCH:
        if finding.kill_scope == "api_key":
            return f"api_key:{finding.api_key_id}" if finding.api_key_id else ""
        return f"account:{finding.account_id}" if finding.account_id else ""
    return f"{finding.subject_kind}:{finding.subject}"


class Detectors:
    """Every detector, fed in log order (see the module)."""

    def __init__(self, config: Callable[[], MonitorConfig], locate: Locate) -> None:
        self._config = config
        current = config()
        self._in_force = current
        self.rate = RateSpikes(current.rate_spike)
        self.orders = [OrderSpikes(name, getattr(current, name)) for name in (VOLUME, NOTIONAL)]
        self.geography = Geography(current.geography, locate)
        self.bursts = [
            Bursts(name, getattr(current, name)) for name in (AUTH_FAILURES, PERMISSION_SCAN, RISK_REJECTIONS)
        ]
        self.events = 0

    def _refresh(self) -> MonitorConfig:
        current = self._config()
        if current is not self._in_force:
            self._in_force = current
            self.rate.configure(current.rate_spike)
            for orders in self.orders:
                orders.configure(getattr(current, orders.name))
            self.geography.configure(current.geography)
            for burst in self.bursts:
                burst.configure(getattr(current, burst.name))
        return current

    @property
    def config(self) -> MonitorConfig:
        return self._in_force

    def detect(self, events: Sequence[AuditEvent], since: int = 0) -> list[Finding]:
        """The findings of `events` (in log order); those triggered by an entry before `since` (a replay that
        warms the detectors up after a restart: their alerts were committed before) are dropped."""
        config = self._refresh()
        excluded = tuple(f"/svc/{name}" for name in config.exclude_recorders)
        findings: dict[str, Finding] = {}
        for event in events:
            self.events += 1
            if excluded and event.recorder.endswith(excluded):
                continue
            found = (
                *self.rate.observe(event),
                *(f for orders in self.orders for f in orders.observe(event)),
                *self.geography.observe(event),
                *(f for burst in self.bursts for f in burst.observe(event)),
            )
            if event.sequence < since:
                continue
            for finding in found:
                findings.setdefault(finding.alert_id, finding)
        return list(findings.values())

    def counts(self) -> list[DetectorCount]:
        config = self._in_force
        geo = config.geography
        return [
            DetectorCount("rate_spike", config.rate_spike.enabled, self.rate.alerts, self.rate.tracked()),
            *(DetectorCount(o.name, o.config.enabled, o.alerts, o.tracked()) for o in self.orders),
            DetectorCount(
                NEW_COUNTRY,
                geo.enabled and geo.new_country is not None,
                self.geography.alerts[NEW_COUNTRY],
                self.geography.tracked(),
            ),
            DetectorCount(
                IMPOSSIBLE_TRAVEL,
                geo.enabled and geo.impossible_travel is not None,
                self.geography.alerts[IMPOSSIBLE_TRAVEL],
                self.geography.tracked(),
            ),
            *(DetectorCount(b.name, b.config.enabled, b.alerts, b.tracked()) for b in self.bursts),
        ]


class Watchers:
    """The WatchAlerts streams: each has a bounded queue (`max_queue`); one that falls that far behind is
    dropped (its stream ends; it resumes with `since`) rather than holding alerts without bound."""

    def __init__(self, max_queue: int = 1000) -> None:
        self._queues: set[asyncio.Queue[Alert | None]] = set()
        self._max_queue = max_queue

    def __len__(self) -> int:
        return len(self._queues)

    def subscribe(self) -> asyncio.Queue[Alert | None]:
        queue: asyncio.Queue[Alert | None] = asyncio.Queue(self._max_queue)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Alert | None]) -> None:
        self._queues.discard(queue)

    def publish(self, alert: Alert) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self._queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)  # the end of that stream


class Monitor:
    """The engine (see the module)."""

    def __init__(
        self,
        store: MonitorStore,
        detectors: Detectors,
        actuator: Actuator,
        clock_us: Callable[[], int],
    ) -> None:
        self.store = store
        self.detectors = detectors
        self.actuator = actuator
        self.clock_us = clock_us
        self.budget = Budget(detectors.config.budgets)
        self.watchers = Watchers()
        self.position = 0
        self.last_record_us = 0
        self.lag_us = 0
        self.actions_done = 0
        self.actions_suppressed = 0
        self.following = False

    async def open(self) -> None:
        """The stored position; then the actions a crash left pending."""
        self.position, self.last_record_us = await self.store.position()
        for alert in await self.store.pending():
            await self.carry_out(alert)

    async def process(self, events: Sequence[AuditEvent]) -> list[Alert]:
        """One batch, in log order, starting at the current position (see the module); the alerts raised."""
        if not events:
            return []
        findings = self.detectors.detect(events, since=self.position)
        last = events[-1]
        if last.sequence < self.position:
            return []  # a replay of entries processed before (the detectors warmed up, nothing to commit)
        return await self._commit(findings, last.sequence + 1, last.record_time_us)

    async def gap(self, requested: int, first_available: int) -> list[Alert]:
        """Entries `requested`..`first_available - 1` were archived before they were read (see the module)."""
        now = self.clock_us()
        finding = Finding(
            detector=AUDIT_GAP,
            severity=Severity.CRITICAL,
            subject_kind="log",
            subject="audit",
            window_us=requested,
            summary=(
                f"audit entries {requested}..{first_available - 1} were archived before the monitor read them: "
                "not analysed (read them from the archive: tradeguard audit export)"
            ),
            event_time_us=now,
            evidence={"first_missed": str(requested), "first_available": str(first_available)},
        )
        return await self._commit([finding], first_available, self.last_record_us)

    async def _commit(self, findings: Sequence[Finding], position: int, record_time_us: int) -> list[Alert]:
        now = self.clock_us()
        alerts = [
            Alert(
                alert_id=f.alert_id,
                finding=f,
                raised_us=now,
                actions=tuple(
                    ActionRecord(kind, action_target(f, kind), ActionStatus.PENDING) for kind in f.actions
                ),
            )
            for f in findings
        ]
        created = await self.store.commit(position, record_time_us, alerts)
        self.position = max(self.position, position)
        self.last_record_us = record_time_us
        self.lag_us = max(0, now - record_time_us) if record_time_us else 0
        for alert in created:
            self.watchers.publish(alert)
        if created:
            await asyncio.gather(*(self.carry_out(alert) for alert in created))
        return created

    async def carry_out(self, alert: Alert) -> Alert:
        """Every PENDING action of `alert`, in order; the alert with their outcomes."""
        self.budget.configure(self.detectors.config.budgets)
        done: list[ActionRecord] = []
        for action in alert.actions:
            if action.status is not ActionStatus.PENDING:
                done.append(action)
                continue
            now = self.clock_us()
            if not action.target:
                status, detail = ActionStatus.SKIPPED, "no target (the events named none)"
            elif not self.budget.take(action.kind, now):
                status, detail = (
                    ActionStatus.SUPPRESSED,
                    f"over the {action.kind.name.lower()} budget per minute",
                )
            else:
                try:
                    status, detail = await self.actuator.act(alert, action)
                except Exception as error:  # an actuator that fails unexpectedly: the action failed, said why
                    status, detail = ActionStatus.FAILED, f"{type(error).__name__}: {error}"[:256]
            finished = replace(action, status=status, detail=detail, time_us=now)
            if status is ActionStatus.DONE:
                self.actions_done += 1
            elif status is ActionStatus.SUPPRESSED:
                self.actions_suppressed += 1
            await self.store.finish(alert.alert_id, finished)
            await self.actuator.record(alert, finished)
            done.append(finished)
        return replace(alert, actions=tuple(done))
