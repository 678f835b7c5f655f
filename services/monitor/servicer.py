"""The monitor's gRPC API (tradeguard.monitor.v1.MonitorService): proto ↔ the engine and its store, nothing more.

- ListAlerts: newest first; page_size 0 → 100, at most 1,000; a malformed page token is INVALID_ARGUMENT.
- WatchAlerts: each alert as it is raised; with `since`, the alerts raised from then first (oldest first), then
  the new ones, none twice. At most WATCHERS streams at once (RESOURCE_EXHAUSTED beyond); a stream that falls
  `Watchers.max_queue` alerts behind is ended (UNAVAILABLE reason WATCH_BEHIND: resume with `since`).
- AcknowledgeAlert: NOT_FOUND for an unknown id; an acknowledged alert keeps its first acknowledgement; the note
  is at most 1,000 characters; who acknowledged is the caller's workload (its SPIFFE ID).
- GetStatus: the engine's position and lag, the detectors' counts, the configuration in force and its last
  refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

from google.protobuf import duration_pb2, timestamp_pb2

from services.monitor.config_file import MonitorFile
from services.monitor.core.engine import Monitor
from services.monitor.model import Alert, AlertFilter, AlertState, Severity
from tradeguard.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tradeguard.mesh.identity import peer_spiffe_id
from tradeguard.monitor.v1 import monitor_pb2 as pb
from tradeguard.monitor.v1 import monitor_pb2_grpc

__all__ = ["MAX_NOTE", "MonitorServicer", "alert_proto"]

Context = Any  # grpc.aio.ServicerContext
MAX_NOTE: Final = 1000
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def _micros(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def alert_proto(alert: Alert) -> pb.Alert:
    f = alert.finding
    message = pb.Alert(
        alert_id=alert.alert_id,
        detector=f.detector,
        severity=pb.Severity.ValueType(int(f.severity)),
        subject_kind=f.subject_kind,
        subject=f.subject,
        summary=f.summary,
        evidence=dict(f.evidence),
        sequences=list(f.sequences),
        event_time=timestamp(f.event_time_us),
        raised_time=timestamp(alert.raised_us),
        state=pb.AlertState.ValueType(int(alert.state)),
        acknowledged_by=alert.acknowledged_by,
        note=alert.note,
        account_id=f.account_id,
        api_key_id=f.api_key_id,
        actions=[
            pb.Action(
                kind=pb.ActionKind.ValueType(int(a.kind)),
                target=a.target,
                status=pb.ActionStatus.ValueType(int(a.status)),
                detail=a.detail,
                time=timestamp(a.time_us) if a.time_us else None,
            )
            for a in alert.actions
        ],
    )
    if alert.acknowledged_us:
        message.acknowledged_time.CopyFrom(timestamp(alert.acknowledged_us))
    return message


def _severity(value: int, name: str) -> Severity | None:
    if value == 0:
        return None
    try:
        return Severity(value)
    except ValueError:
        raise InvalidArgument.field(name, "not a severity") from None


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor, config: MonitorFile, *, max_watchers: int = 64) -> None:
        self._monitor = monitor
        self._config = config
        self._max_watchers = max_watchers

    async def ListAlerts(self, request: pb.ListAlertsRequest, context: Context) -> pb.ListAlertsResponse:
        if not 0 <= request.page_size <= MAX_PAGE:
            raise InvalidArgument.field("page_size", f"0 to {MAX_PAGE}")
        state: AlertState | None = None
        if request.state:
            try:
                state = AlertState(request.state)
            except ValueError:
                raise InvalidArgument.field("state", "not an alert state") from None
        query = AlertFilter(
            detector=request.detector,
            state=state,
            min_severity=_severity(request.min_severity, "min_severity"),
            subject=request.subject,
            since_us=_micros(request.since) if request.HasField("since") else 0,
        )
        try:
            alerts, token = await self._monitor.store.list(
                query, request.page_size or DEFAULT_PAGE, request.page_token
            )
        except ValueError:
            raise InvalidArgument.field("page_token", "not a token from a previous response") from None
        return pb.ListAlertsResponse(alerts=[alert_proto(a) for a in alerts], next_page_token=token)

    async def WatchAlerts(
        self, request: pb.WatchAlertsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAlertsResponse]:
        watchers = self._monitor.watchers
        if len(watchers) >= self._max_watchers:
            raise ResourceExhausted("watchers", f"at most {self._max_watchers} WatchAlerts streams", 1.0)
        minimum = _severity(request.min_severity, "min_severity")
        queue = watchers.subscribe()  # before the past ones are read: none raised meanwhile is missed
        try:
            sent: set[str] = set()
            if request.HasField("since"):
                past: list[Alert] = []
                token = ""
                query = AlertFilter(min_severity=minimum, since_us=_micros(request.since))
                while True:
                    page, token = await self._monitor.store.list(query, MAX_PAGE, token)
                    past.extend(page)
                    if not token:
                        break
                for alert in reversed(past):
                    sent.add(alert.alert_id)
                    yield pb.WatchAlertsResponse(alert=alert_proto(alert))
            while True:
                raised = await queue.get()
                if raised is None:
                    raise Unavailable(
                        "this stream fell too far behind: watch again with since", reason="WATCH_BEHIND"
                    )
                if raised.alert_id in sent or (minimum is not None and raised.finding.severity < minimum):
                    continue
                yield pb.WatchAlertsResponse(alert=alert_proto(raised))
        finally:
            watchers.unsubscribe(queue)

    async def AcknowledgeAlert(
        self, request: pb.AcknowledgeAlertRequest, context: Context
    ) -> pb.AcknowledgeAlertResponse:
        if not request.alert_id:
            raise InvalidArgument.field("alert_id", "required")
        if len(request.note) > MAX_NOTE:
            raise InvalidArgument.field("note", f"at most {MAX_NOTE} characters")
        by = peer_spiffe_id(context) or ""
        alert = await self._monitor.store.acknowledge(
            request.alert_id, by, request.note, self._monitor.clock_us()
        )
        if alert is None:
            raise NotFound(f"no alert {request.alert_id!r}", reason="ALERT_NOT_FOUND")
        return pb.AcknowledgeAlertResponse(alert=alert_proto(alert))

    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.GetStatusResponse:
        monitor = self._monitor
        lag = monitor.lag_us
        return pb.GetStatusResponse(
            position=monitor.position,
            following=monitor.following,
            lag=duration_pb2.Duration(seconds=lag // 1_000_000, nanos=lag % 1_000_000 * 1000),
            last_record_time=timestamp(monitor.last_record_us),
            events=monitor.detectors.events,
            detectors=[
                pb.DetectorStatus(name=c.name, enabled=c.enabled, alerts=c.alerts, tracked=c.tracked)
                for c in monitor.detectors.counts()
            ],
            open_alerts=await monitor.store.open_alerts(),
            actions_done=monitor.actions_done,
            actions_suppressed=monitor.actions_suppressed,
            config_sha256=self._config.sha256,
            config_error=self._config.last_error,
        )
