"""Which field of an event a subject kind names (`subject_of`), shared by the detectors."""

from __future__ import annotations

from services.monitor.model import AuditEvent

__all__ = ["subject_of"]


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
