"""Which field of an event a subject kind names (`subject_of`), and whether an event is a call made with a key
(`is_traffic`), shared by the detectors."""

from __future__ import annotations

from services.monitor.model import AuditEvent

__all__ = ["SECURITY_RECORDERS", "is_traffic", "subject_of"]

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
