"""Bursts of refusals per subject in a sliding window: detectors `auth_failures` (outcome DENIED_AUTHENTICATION:
brute force, credential stuffing, forged signatures — the guard's refusals, the auth service's own `login` and
`edge.authorize` refusals alike), `permission_scan` (DENIED_PERMISSION: the number of DISTINCT methods refused,
someone probing what a key may do) and `risk_rejections` (DENIED_RISK: orders refused by the pre-trade checks or
the kill switch).

Per subject (each configured kind: api_key, account, source_ip, principal), the times of its last `threshold`
matching events are kept (for `permission_scan`, the last time per distinct method, at most `threshold`). A
finding is raised when `threshold` of them fall within `window_us` ending at the current event — at once, with
the event that completes the burst. The subject is then quiet until one window after the burst's first event;
a burst that goes on raises again per window. The finding's window (part of its id) is the start of the burst:
the first of the `threshold` events, so the same events read again make the same id.

Memory: at most `threshold` times per subject and `max_subjects` subjects per kind, least recently seen
forgotten (`Bounded`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from services.monitor.core.config import BurstConfig, Rule
from services.monitor.core.lru import PerSubject
from services.monitor.core.subjects import finding, subject_of
from services.monitor.model import MAX_SEQUENCES, AuditEvent, Finding, Outcome

__all__ = ["AUTH_FAILURES", "PERMISSION_SCAN", "RISK_REJECTIONS", "Bursts"]

AUTH_FAILURES: Final = "auth_failures"
PERMISSION_SCAN: Final = "permission_scan"
RISK_REJECTIONS: Final = "risk_rejections"

_OUTCOMES: Final = {
    AUTH_FAILURES: Outcome.DENIED_AUTHENTICATION,
    PERMISSION_SCAN: Outcome.DENIED_PERMISSION,
    RISK_REJECTIONS: Outcome.DENIED_RISK,
}
_WHAT: Final = {
    AUTH_FAILURES: "failed authentications",
    PERMISSION_SCAN: "methods refused for want of a permission",
    RISK_REJECTIONS: "orders refused by risk checks",
}


@dataclass(slots=True)
class _Window:
    times: deque[tuple[int, int]] = field(default_factory=deque)  # (time, sequence), oldest first
    methods: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)  # permission_scan
    quiet_until: int = -1


class Bursts(PerSubject[BurstConfig, _Window]):
    """One burst detector (`name`: auth_failures, permission_scan or risk_rejections); see the module."""

    def __init__(self, name: str, config: BurstConfig) -> None:
        if name not in _OUTCOMES:
            raise ValueError(f"unknown burst detector {name!r}")
        super().__init__(config)
        self.name = name
        self.outcome = _OUTCOMES[name]

    def observe(self, event: AuditEvent) -> list[Finding]:
        config = self.config
        if not config.enabled or event.outcome is not self.outcome:
            return []
        findings: list[Finding] = []
        for kind, rule in config.subjects.items():
            subject = subject_of(event, kind)
            if not subject:
                continue
            memory = self._subjects.of(kind)
            window = memory.setdefault(subject, _Window)
            found = self._add(
                window, event, kind=kind, subject=subject, rule=rule, window_us=config.window_us
            )
            if found is not None:
                findings.append(found)
        return findings

    def _add(
        self, window: _Window, event: AuditEvent, *, kind: str, subject: str, rule: Rule, window_us: int
    ) -> Finding | None:
        now = event.time_us
        entry = (now, event.sequence)
        if self.name == PERMISSION_SCAN:
            window.methods[event.method] = entry
            window.methods.move_to_end(event.method)
            while len(window.methods) > rule.threshold:
                window.methods.popitem(last=False)
            burst = sorted(window.methods.values())
        else:
            window.times.append(entry)
            while len(window.times) > rule.threshold:
                window.times.popleft()
            burst = list(window.times)
        if len(burst) < rule.threshold or now < window.quiet_until:
            return None
        first = burst[0][0]
        if now - first > window_us:
            return None
        window.quiet_until = first + window_us
        self.alerts += 1
        seconds = window_us / 1_000_000
        return finding(
            self.name,
            rule,
            event,
            subject_kind=kind,
            subject=subject,
            window_us=first,
            summary=f"{kind} {subject}: {len(burst)} {_WHAT[self.name]} within {seconds:g} s",
            evidence={
                "count": str(len(burst)),
                "window_s": f"{seconds:g}",
                "first_time_us": str(first),
                "last_method": event.method,
                "last_action": event.action,
                "last_source_ip": event.source_ip,
                **({"cause": event.details["cause"]} if "cause" in event.details else {}),
                **(
                    {"methods": ",".join(sorted(window.methods))[:512]}
                    if self.name == PERMISSION_SCAN
                    else {}
                ),
            },
            sequences=tuple(sequence for _, sequence in burst[-MAX_SEQUENCES:]),
        )
