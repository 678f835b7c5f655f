"""Request-rate baselines per subject (API key, account): detector `rate_spike`.

Only traffic is counted (`is_traffic`: calls recorded by a guard, not the auth service's or the key vault's own
security events such as a key's creation). Each subject's events are counted in buckets of `bucket_us` (by event time: bucket index = time // bucket_us).
When a bucket closes its count updates the subject's exponentially weighted mean and variance (weight `alpha`;
the empty buckets between two events count as zeros, at most `MAX_GAP_BUCKETS` of them, after which the
baseline is simply decayed to zero). A subject observed for fewer than `warmup_buckets` closed buckets never
alerts. Afterwards, as soon as the CURRENT bucket's count exceeds

    threshold(subject kind)   and   mean + sigmas x max(spread, sqrt(mean), 1)

a finding is raised, at once (within the event that crossed it), once per bucket: the bucket's start is the
window in its id, so the same events read again raise the same alert. The spread is floored at sqrt(mean) (the
Poisson noise of a steady rate) and at 1, so a perfectly regular subject does not alert on one extra call.

Memory: one `Baseline` (five numbers) per subject, at most `max_subjects` per subject kind, least recently
seen forgotten (`Bounded`); a forgotten subject starts its warm-up again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from services.monitor.core.config import RateConfig
from services.monitor.core.lru import PerSubject
from services.monitor.core.subjects import finding, is_traffic, subject_of
from services.monitor.model import MAX_SEQUENCES, AuditEvent, Finding

__all__ = ["MAX_GAP_BUCKETS", "NAME", "Baseline", "RateSpikes"]

NAME: Final = "rate_spike"
MAX_GAP_BUCKETS: Final = 1000


@dataclass(slots=True)
class Baseline:
    """One subject's EWMA baseline of a per-bucket value (a count here; an amount in services/monitor/core/orders.py,
    which passes the closing value to `close_until`)."""

    bucket: int  # the current bucket's index
    count: int = 0  # events in it
    mean: float = 0.0
    var: float = 0.0
    closed: int = 0  # buckets closed so far (warm-up)
    alerted: int = -1  # the bucket last alerted on
    recent: list[int] = field(
        default_factory=list
    )  # sequences in the current bucket (the last MAX_SEQUENCES)

    def add(self, bucket: int, sequence: int, alpha: float, closing: float | Decimal | None = None) -> bool:
        """Count an event of `bucket` (its sequence kept among the last MAX_SEQUENCES), closing the current bucket
        first (its value: `closing`, else its count) when `bucket` is later; False, and nothing counted, for an
        event older than the bucket being counted (recorders' clocks differ)."""
        if bucket > self.bucket:
            self.close_until(bucket, alpha, None if closing is None else float(closing))
        elif bucket < self.bucket:
            return False
        self.count += 1
        self.recent.append(sequence)
        if len(self.recent) > MAX_SEQUENCES:
            del self.recent[0]
        return True

    def close_until(self, bucket: int, alpha: float, value: float | None = None) -> None:
        """Close the current bucket (its value: `value`, else its count) and the empty ones before `bucket`."""
        gap = bucket - self.bucket
        self._update(self.count if value is None else value, alpha)
        empty = gap - 1
        if empty > MAX_GAP_BUCKETS:
            self.mean, self.var = 0.0, 0.0
            self.closed += empty
        else:
            for _ in range(empty):
                self._update(0, alpha)
        self.bucket, self.count = bucket, 0
        self.recent.clear()

    def _update(self, value: float, alpha: float) -> None:
        if self.closed == 0:
            self.mean, self.var = value, 0.0
        else:
            diff = value - self.mean
            increment = alpha * diff
            self.mean += increment
            self.var = (1 - alpha) * (self.var + diff * increment)
        self.closed += 1

    def limit(self, sigmas: float) -> float:
        return self.mean + sigmas * max(math.sqrt(self.var), math.sqrt(self.mean), 1.0)


class RateSpikes(PerSubject[RateConfig, Baseline]):
    """The `rate_spike` detector (see the module)."""

    def observe(self, event: AuditEvent) -> list[Finding]:
        config = self.config
        if not config.enabled or not is_traffic(event):
            return []
        findings: list[Finding] = []
        bucket = event.time_us // config.bucket_us
        for kind, rule in config.subjects.items():
            subject = subject_of(event, kind)
            if not subject:
                continue
            memory = self._subjects.of(kind)
            state = memory.setdefault(subject, lambda: Baseline(bucket))
            if not state.add(bucket, event.sequence, config.alpha):
                continue  # an event older than the bucket being counted: not counted
            if state.closed < config.warmup_buckets or state.alerted == bucket:
                continue
            limit = state.limit(config.sigmas)
            if state.count < rule.threshold or state.count <= limit:
                continue
            state.alerted = bucket
            self.alerts += 1
            findings.append(
                finding(
                    NAME,
                    rule,
                    event,
                    subject_kind=kind,
                    subject=subject,
                    window_us=bucket * config.bucket_us,
                    summary=(
                        f"{kind} {subject}: {state.count} calls in {config.bucket_us // 1_000_000} s "
                        f"against a baseline of {state.mean:.1f}"
                    ),
                    evidence={
                        "count": str(state.count),
                        "mean": f"{state.mean:.3f}",
                        "spread": f"{math.sqrt(state.var):.3f}",
                        "limit": f"{limit:.1f}",
                        "bucket_s": str(config.bucket_us / 1_000_000),
                        "buckets_observed": str(state.closed),
                    },
                    sequences=tuple(state.recent),
                )
            )
        return findings
