"""How an alert leaves the monitor: formats only (pure: no I/O).

- `alert_json(alert)`: the alert as one JSON object (the webhook's body; the log line's fields).
- `sign(secret, timestamp_us, body)`: the webhook's signature, lowercase hex HMAC-SHA256 over
  "<timestamp_us>.<body>" with the secret's UTF-8 bytes (Stripe's scheme: the timestamp is signed with the body,
  so a receiver that refuses old timestamps refuses replays).
- `syslog_line(alert, hostname)`: an RFC 5424 message, `<PRI>1 TIMESTAMP HOSTNAME tradeguard-monitor - alert
  [tradeguard@32473 alertId="…" detector="…" subject="…" severity="…"] summary`, facility 14 (log alert), the
  syslog severity by the alert's (critical 2, warning 4, info 6), the time in UTC with microseconds; structured
  data values escape `"`, `\\` and `]`; line breaks in the message become spaces (one alert, one line).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any, Final

from services.monitor.model import Alert, Severity

__all__ = ["APP_NAME", "alert_json", "sign", "syslog_line"]

APP_NAME: Final = "tradeguard-monitor"
_FACILITY: Final = 14
_SYSLOG_SEVERITY: Final = {Severity.CRITICAL: 2, Severity.WARNING: 4, Severity.INFO: 6}


def alert_dict(alert: Alert) -> dict[str, Any]:
    f = alert.finding
    return {
        "alert_id": alert.alert_id,
        "detector": f.detector,
        "severity": f.severity.name.lower(),
        "subject_kind": f.subject_kind,
        "subject": f.subject,
        "summary": f.summary,
        "account_id": f.account_id,
        "api_key_id": f.api_key_id,
        "event_time_us": f.event_time_us,
        "raised_us": alert.raised_us,
        "evidence": dict(f.evidence),
        "sequences": list(f.sequences),
        "actions": [a.kind.name.lower() for a in alert.actions],
    }


def alert_json(alert: Alert) -> str:
    return json.dumps(alert_dict(alert), sort_keys=True, separators=(",", ":"))


def sign(secret: str, timestamp_us: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp_us).encode() + b"." + body, hashlib.sha256).hexdigest()


def _sd(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_line(alert: Alert, hostname: str = "-") -> str:
    f = alert.finding
    pri = _FACILITY * 8 + _SYSLOG_SEVERITY[f.severity]
    when = datetime.fromtimestamp(alert.raised_us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    data = " ".join(
        f'{name}="{_sd(value)}"'
        for name, value in (
            ("alertId", alert.alert_id),
            ("detector", f.detector),
            ("subject", f"{f.subject_kind}:{f.subject}"),
            ("severity", f.severity.name.lower()),
        )
    )
    message = " ".join(f.summary.split())
    host = "".join(ch for ch in hostname if 33 <= ord(ch) <= 126)[:255] or "-"
    return f"<{pri}>1 {when} {host} {APP_NAME} - alert [tradeguard@32473 {data}] {message}"
