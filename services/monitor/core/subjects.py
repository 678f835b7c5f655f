"""Which field of an event a subject kind names (`subject_of`), whether an event is a call made with a key
(`is_traffic`), and a finding about an event under a rule (`finding`), shared by the detectors."""

from __future__ import annotations

from collections.abc import Mapping

from services.monitor.core.config import Rule
from services.monitor.model import AuditEvent, Finding

__all__ = ["SECURITY_RECORDERS", "finding", "is_traffic", "subject_of"]

#: workloads whose entries are their own security events (logins, key administration, decryptions), not calls
#: made with a key: an API key's creation by an operator names the key but is not its traffic
SECURITY_RECORDERS = ("/svc/auth", "/svc/keyvault")


def is_traffic(event: AuditEvent) -> bool:
    """Whether `event` is a call made by its caller (recorded by a guard), not the auth service's or the key
    vault's own security event: what request-rate baselines and geography learn from."""
    return not event.recorder.endswith(SECURITY_RECORDERS)


def subject_of(event: AuditEvent, kind: str) -> str:
    """The event's value for a subject kind ("api_key", "account", "source_ip", "principal"); "" when unset."""
    if kind == "api_key":
        return event.api_key_id
    if kind == "account":
        return event.account_id
    if kind == "source_ip":
        return event.source_ip
    if kind == "principal":
        return event.principal
    return ""


def finding(
    detector: str,
    rule: Rule,
    event: AuditEvent,
    *,
    subject_kind: str,
    subject: str,
    window_us: int,
    summary: str,
    evidence: Mapping[str, str],
    sequences: tuple[int, ...],
) -> Finding:
    """What `detector` raises on `event` under `rule`: the rule's severity, actions and kill scope, the event's
    time, account and API key, and what the detector says."""
    return Finding(
        detector=detector,
        severity=rule.severity,
        subject_kind=subject_kind,
        subject=subject,
        window_us=window_us,
        summary=summary,
        event_time_us=event.time_us,
        evidence=evidence,
        sequences=sequences,
        account_id=event.account_id,
        api_key_id=event.api_key_id,
        actions=rule.actions,
        kill_scope=rule.kill_scope,
    )
