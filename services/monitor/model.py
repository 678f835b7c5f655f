"""The monitor's types. Imports nothing else of the service.

- `AuditEvent`: what the detectors read of one audit log entry (decoded from the audit service's `StoredEntry` by
  the tail, services/monitor/tail.py): where it is in the log, when it happened, who, what, how it ended.
- `Finding`: what a detector raises: detector, subject, severity, the figures behind it (`evidence`), the entries
  that triggered it (`sequences`) and the window it belongs to (`window_us`). Its `alert_id` is derived from
  (detector, subject kind, subject, window start) only, so the same events read again after a restart make the
  same id and the store keeps the first one: an alert is raised, and acted on, once.
- `Alert`: a finding as stored, with its handling state and the actions taken (`ActionRecord`).
- `ActionKind`, `ActionStatus`, `Severity`, `AlertState`: the API's enums, by name.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from tradeguard.audit.outcome import Outcome

__all__ = [
    "MAX_SEQUENCES",
    "ActionKind",
    "ActionRecord",
    "Alert",
    "AlertFilter",
    "AlertState",
    "AuditEvent",
    "Finding",
    "Outcome",
    "Severity",
    "alert_id",
]

MAX_SEQUENCES: Final = 20  # audit entries kept as an alert's evidence (the last ones)


class Severity(enum.IntEnum):
    INFO = 1
    WARNING = 2
    CRITICAL = 3


class AlertState(enum.IntEnum):
    OPEN = 1
    ACKNOWLEDGED = 2


class ActionKind(enum.IntEnum):
    NOTIFY = 1
    REVOKE_KEY = 2
    KILL_SWITCH = 3


class ActionStatus(enum.IntEnum):
    PENDING = 0  # stored with its alert, not carried out yet (an outbox row: carried out after a restart too)
    DONE = 1
    SUPPRESSED = 2
    FAILED = 3
    SKIPPED = 4


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit log entry as the detectors see it (times in µs since the epoch, UTC)."""

    sequence: int
    time_us: int  # when it happened (the recorder's clock)
    record_time_us: int  # when the audit service recorded it
    recorder: str = ""  # the appending workload's SPIFFE ID
    principal: str = ""
    account_id: str = ""
    api_key_id: str = ""
    source_ip: str = ""
    method: str = ""
    action: str = ""
    outcome: Outcome = Outcome.OK
    status_code: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


def alert_id(detector: str, subject_kind: str, subject: str, window_us: int) -> str:
    """The id of the alert a detector raises for `subject` in the window starting at `window_us`: the same inputs
    always give the same id, "<detector>-<128 bits of their SHA-256 in UUID form>" (the UUID form because the audit
    service refuses event ids that look like secrets, and the monitor's audit events are keyed by alert id)."""
    digest = hashlib.sha256(f"{detector}\0{subject_kind}\0{subject}\0{window_us}".encode()).digest()
    return f"{detector}-{uuid.UUID(bytes=digest[:16])}"


@dataclass(frozen=True, slots=True)
class Finding:
    """What a detector raised (see the module). `actions` are what the configuration's policy asks for; the
    kill switch's scope is `kill_scope` ("account" or "api_key") on `account_id` / `api_key_id`."""

    detector: str
    severity: Severity
    subject_kind: str  # "api_key", "account", "source_ip", "principal", "log"
    subject: str
    window_us: int  # the start of the window the finding belongs to (part of its id)
    summary: str
    event_time_us: int
    evidence: Mapping[str, str] = field(default_factory=dict)
    sequences: tuple[int, ...] = ()
    account_id: str = ""
    api_key_id: str = ""
    actions: tuple[ActionKind, ...] = (ActionKind.NOTIFY,)
    kill_scope: str = "account"

    @property
    def alert_id(self) -> str:
        return alert_id(self.detector, self.subject_kind, self.subject, self.window_us)


@dataclass(frozen=True, slots=True)
class ActionRecord:
    kind: ActionKind
    target: str
    status: ActionStatus
    detail: str = ""
    time_us: int = 0


@dataclass(frozen=True, slots=True)
class Alert:
    """A finding as stored: its id, when it was raised, its state and the actions taken."""

    alert_id: str
    finding: Finding
    raised_us: int
    state: AlertState = AlertState.OPEN
    acknowledged_by: str = ""
    note: str = ""
    acknowledged_us: int = 0
    actions: tuple[ActionRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """ListAlerts' filter: every set field must match."""

    detector: str = ""
    state: AlertState | None = None
    min_severity: Severity | None = None
    subject: str = ""
    since_us: int = 0
