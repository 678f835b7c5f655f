"""Carrying out actions (the engine's `Actuator`, services/monitor/core/engine.py) and recording each one in the
audit log with its evidence.

- NOTIFY: one `monitor_alert` log line (the alert's fields); the webhook when WEBHOOK_URL is set (POST of
  `notify.alert_json`, signed: `x-tradeguard-timestamp`, `x-tradeguard-signature`, and `x-tradeguard-alert-id`
  for the receiver's idempotency; 2 s timeout, run off the event loop); an RFC 5424 datagram to SYSLOG_TARGET when
  set. DONE when every configured channel took it, FAILED naming the one that did not.
- REVOKE_KEY: AuthService/RevokeApiKey(key id) over mutual TLS as workload `monitor` (the auth policy allows
  it). Revoking a key already revoked is done again, harmlessly. This and the kill switch are tried again twice
  (after 0.2 and 0.5 s) when the service is unavailable or slow; any other refusal fails the action at once.
- KILL_SWITCH: TradingService/EngageKillSwitch at the finding's scope (account or API key), signed with the
  monitor's own API key (`KILL_SWITCH_CREDENTIALS_FILE`; absent: SKIPPED). Engaging an engaged scope finds the
  switch in force.
- `record`: one audit event per action (action `monitor.<kind>`, outcome OK when done, FAILED otherwise with the
  status in `status_code`: RESOURCE_EXHAUSTED for a suppressed one, FAILED_PRECONDITION for a skipped one), its
  details the alert's id, detector, subject, summary, the triggering entries' sequences and the evidence. Its
  event id is derived from the alert id and the action's kind, so recording it again (after a restart) is the
  same entry (the audit service's idempotency on (recorder, event id)).
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

import grpc

from services.monitor import notify
from services.monitor.model import ActionKind, ActionRecord, ActionStatus, Alert
from tradeguard.audit.recorder import Recorder
from tradeguard.audit.v1 import audit_pb2 as audit_pb
from tradeguard.auth.v1 import auth_pb2, auth_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.status import describe_failure
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

__all__ = ["Actions", "load_credentials"]

TIMEOUT_S: Final = 2.0
RETRY_DELAYS_S: Final = (0.2, 0.5)  # a revocation or kill switch is tried 3 times in about 5 s at most
_TRANSIENT: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
REVOKE_METHOD: Final = "/tradeguard.auth.v1.AuthService/RevokeApiKey"
KILL_METHOD: Final = "/tradeguard.trading.v1.TradingService/EngageKillSwitch"
_METHODS: Final = {
    ActionKind.NOTIFY: "monitor/notify",
    ActionKind.REVOKE_KEY: REVOKE_METHOD,
    ActionKind.KILL_SWITCH: KILL_METHOD,
}
_STATUS_CODES: Final = {
    ActionStatus.DONE: "OK",
    ActionStatus.FAILED: "UNAVAILABLE",
    ActionStatus.SUPPRESSED: "RESOURCE_EXHAUSTED",
    ActionStatus.SKIPPED: "FAILED_PRECONDITION",
}
_SCOPES: Final = {
    "account": trading_pb2.KILL_SWITCH_SCOPE_ACCOUNT,
    "api_key": trading_pb2.KILL_SWITCH_SCOPE_API_KEY,
}

_log = get_logger("services.monitor.actions")


def load_credentials(path: Path | None) -> ApiKeyCredentials | None:
    """The monitor's API key from its owner-only JSON file, None when there is none; refused (ValueError) when
    group or others may read it or it is not `{"key_id": ..., "secret": ...}`."""
    if path is None or not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} must be readable by its owner only (chmod 600)")
    data = json.loads(path.read_text())
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("key_id"), str)
        or not isinstance(data.get("secret"), str)
    ):
        raise ValueError(f'{path} must hold {{"key_id": ..., "secret": ...}}')
    return ApiKeyCredentials(data["key_id"], secret=data["secret"])


class Actions:
    """The actuator (see the module). `trading` is None when the monitor has no API key for the kill switch."""

    def __init__(
        self,
        *,
        auth: grpc.aio.Channel,
        trading: grpc.aio.Channel | None,
        recorder: Recorder,
        webhook_url: str = "",
        webhook_secret: str = "",
        syslog_target: str = "",
        clock_us: Callable[[], int],
    ) -> None:
        self._auth = auth_pb2_grpc.AuthServiceStub(auth)
        self._trading = None if trading is None else trading_pb2_grpc.TradingServiceStub(trading)
        self._recorder = recorder
        self._webhook_url = webhook_url
        self._webhook_secret = webhook_secret
        self._syslog = _address(syslog_target) if syslog_target else None
        self._clock_us = clock_us
        self._hostname = socket.gethostname()
        self.recorded = 0
        self.record_failures = 0

    async def act(self, alert: Alert, action: ActionRecord) -> tuple[ActionStatus, str]:
        if action.kind is ActionKind.NOTIFY:
            return await self._notify(alert)
        if action.kind is ActionKind.REVOKE_KEY:
            try:
                await _retried(
                    lambda: self._auth.RevokeApiKey(
                        auth_pb2.RevokeApiKeyRequest(key_id=action.target), timeout=TIMEOUT_S
                    )
                )
            except grpc.aio.AioRpcError as error:
                return ActionStatus.FAILED, describe_failure(error)[:256]
            _log.warning("monitor_revoked_key", alert_id=alert.alert_id, key_id=action.target)
            return ActionStatus.DONE, ""
        if self._trading is None:
            return ActionStatus.SKIPPED, "no API key for the kill switch (KILL_SWITCH_CREDENTIALS_FILE)"
        scope, _, value = action.target.partition(":")
        trading = self._trading
        try:
            reply = await _retried(
                lambda: trading.EngageKillSwitch(
                    trading_pb2.EngageKillSwitchRequest(
                        scope=_SCOPES[scope],
                        value=value,
                        reason=f"monitor alert {alert.alert_id}: {alert.finding.summary}"[:256],
                    ),
                    timeout=TIMEOUT_S,
                )
            )
        except grpc.aio.AioRpcError as error:
            return ActionStatus.FAILED, describe_failure(error)[:256]
        _log.warning("monitor_kill_switch", alert_id=alert.alert_id, scope=scope, value=value)
        return ActionStatus.DONE, f"cancelled {reply.cancelled_orders} open orders"

    async def _notify(self, alert: Alert) -> tuple[ActionStatus, str]:
        f = alert.finding
        _log.warning(
            "monitor_alert",
            alert_id=alert.alert_id,
            detector=f.detector,
            severity=f.severity.name.lower(),
            subject=f"{f.subject_kind}:{f.subject}",
            summary=f.summary,
            evidence=dict(f.evidence),
            sequences=list(f.sequences),
        )
        problems: list[str] = []
        if self._webhook_url:
            try:
                await asyncio.to_thread(self._post, alert)
            except Exception as error:
                problems.append(f"webhook: {type(error).__name__}: {error}"[:200])
        if self._syslog is not None:
            try:
                self._send_syslog(alert)
            except OSError as error:
                problems.append(f"syslog: {error}"[:200])
        if problems:
            return ActionStatus.FAILED, "; ".join(problems)
        return ActionStatus.DONE, ""

    def _post(self, alert: Alert) -> None:
        body = notify.alert_json(alert).encode()
        timestamp = self._clock_us()
        request = urllib.request.Request(  # noqa: S310 (the URL's scheme is checked by the settings)
            self._webhook_url,
            data=body,
            method="POST",
            headers={
                "content-type": "application/json",
                "x-tradeguard-timestamp": str(timestamp),
                "x-tradeguard-signature": notify.sign(self._webhook_secret, timestamp, body),
                "x-tradeguard-alert-id": alert.alert_id,
            },
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
            if not 200 <= response.status < 300:
                raise OSError(f"HTTP {response.status}")

    def _send_syslog(self, alert: Alert) -> None:
        assert self._syslog is not None
        line = notify.syslog_line(alert, self._hostname).encode()
        family = socket.AF_INET6 if ":" in self._syslog[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(line, self._syslog)

    async def record(self, alert: Alert, action: ActionRecord) -> bool:
        f = alert.finding
        details = {
            "alert_id": alert.alert_id,
            "detector": f.detector,
            "severity": f.severity.name.lower(),
            "subject": f"{f.subject_kind}:{f.subject}",
            "summary": f.summary,
            "target": action.target,
            "status": action.status.name.lower(),
            "sequences": ",".join(str(s) for s in f.sequences),
            **{f"evidence.{name}": value for name, value in list(f.evidence.items())[:20]},
        }
        if action.detail:
            details["detail"] = action.detail
        event = self._recorder.event(
            time_us=action.time_us or self._clock_us(),
            method=_METHODS[action.kind],
            outcome=audit_pb.OUTCOME_OK if action.status is ActionStatus.DONE else audit_pb.OUTCOME_FAILED,
            status=_STATUS_CODES.get(action.status, "UNKNOWN"),
            latency_us=0,
            account_id=f.account_id,
            api_key_id=f.api_key_id,
            resource=action.target,
            action=f"monitor.{action.kind.name.lower()}",
            details=details,
            event_id=f"monitor.{alert.alert_id}.{action.kind.name.lower()}",
        )
        ok = await self._recorder.record(event)
        if ok:
            self.recorded += 1
        else:
            self.record_failures += 1
        return ok


T = TypeVar("T")


async def _retried(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again after `RETRY_DELAYS_S` when the service is unavailable or slow (a restart, a moment of
    overload); any other refusal, or the last failure, is raised. Every retried call is idempotent (revoking a
    revoked key, engaging an engaged switch)."""
    for delay in RETRY_DELAYS_S:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in _TRANSIENT:
                raise
        await asyncio.sleep(delay)
    return await call()


def _address(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)
