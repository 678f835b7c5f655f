"""How an alert leaves the monitor: the webhook's body and signature (HMAC-SHA256 over "<timestamp>.<body>", checked
against an independent computation), and the RFC 5424 syslog line (priority by severity, UTC time with
microseconds, structured data escaped, one line whatever the summary holds)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re

from hypothesis import given
from hypothesis import strategies as st

from services.monitor import notify
from services.monitor.model import ActionKind, ActionRecord, ActionStatus, Alert, Finding, Severity


def alert(
    summary: str = "api_key k1: 10 failed authentications within 60 s", severity: Severity = Severity.CRITICAL
) -> Alert:
    finding = Finding(
        detector="auth_failures", severity=severity, subject_kind="api_key", subject='k1"]\\', window_us=5,
        summary=summary, event_time_us=1_800_000_000_000_001, evidence={"count": "10"}, sequences=(7, 8),
        api_key_id="k1", actions=(ActionKind.NOTIFY, ActionKind.REVOKE_KEY),
    )  # fmt: skip
    return Alert(
        alert_id=finding.alert_id,
        finding=finding,
        raised_us=1_800_000_000_123_456,
        actions=(ActionRecord(ActionKind.NOTIFY, "api_key:k1", ActionStatus.PENDING),),
    )


def test_the_webhook_body_and_signature() -> None:
    body = notify.alert_json(alert()).encode()
    data = json.loads(body)
    assert data["alert_id"].startswith("auth_failures-") and data["severity"] == "critical"
    assert data["sequences"] == [7, 8] and data["evidence"] == {"count": "10"}
    expected = hmac.new(b"a-webhook-secret-0123", b"1800000000123456." + body, hashlib.sha256).hexdigest()
    assert notify.sign("a-webhook-secret-0123", 1_800_000_000_123_456, body) == expected
    assert notify.sign("another-secret-0000000", 1_800_000_000_123_456, body) != expected


def test_the_syslog_line() -> None:
    line = notify.syslog_line(alert(), "host-1")
    assert line.startswith(
        "<114>1 2027-01-15T08:00:00.123456Z host-1 tradeguard-monitor - alert [tradeguard@32473 "
    )
    assert 'subject="api_key:k1\\"\\]\\\\"' in line and 'severity="critical"' in line
    assert line.endswith("] api_key k1: 10 failed authentications within 60 s")
    assert notify.syslog_line(alert(severity=Severity.INFO)).startswith("<118>1 ")


@given(st.text(max_size=200))
def test_one_alert_is_one_line(summary: str) -> None:
    line = notify.syslog_line(alert(summary))
    assert "\n" not in line and "\r" not in line
    assert re.match(r"<\d+>1 \S+ \S+ tradeguard-monitor - alert \[", line)
