"""Order volume and notional baselines per subject (API key, account): detectors `order_volume` and
`order_notional`, one `OrderSpikes` each.

Only orders placed count: OUTCOME_OK events of a `.../PlaceOrder` method recorded by a guard (`is_traffic`), whose
details carry the order as requested (tradeguard/guard/layer.py: `symbol`, `side`, `quantity`, `price`). An
order's amount is its quantity (`order_volume`) or its quantity x price (`order_notional`), in `Decimal`; an order
without a price (a market order) counts in volume only, and one whose quantity or price is not a finite,
non-negative decimal counts in neither (the trading service refuses it anyway; its refusal is a second event).

Otherwise exactly the rate detector's rule (services/monitor/core/baseline.py, same configuration keys): per
subject, the amounts are summed per bucket of `bucket_us` (exactly, in Decimal); a closed bucket's sum updates the
subject's EWMA mean and variance (weight `alpha`, empty buckets count as zeros, at most `MAX_GAP_BUCKETS`); a
subject observed for fewer than `warmup_buckets` closed buckets never alerts; afterwards a finding is raised as
soon as the CURRENT bucket's sum exceeds

    amount threshold(subject kind)   and   mean + sigmas x max(spread, sqrt(mean), 1)

at once (within the order that crossed it), once per bucket, the bucket's start the window in its id. The action
is the rule's: notify, or e.g. the kill switch at account scope for a key sending orders far outside its baseline.

Memory: one `Baseline` and one Decimal sum per subject, at most `max_subjects` per subject kind, least recently
seen forgotten (`Bounded`); a forgotten subject starts its warm-up again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final

from services.monitor.core.baseline import Baseline
from services.monitor.core.config import RateConfig
from services.monitor.core.lru import PerSubject
from services.monitor.core.subjects import finding, is_traffic, subject_of
from services.monitor.model import AuditEvent, Finding, Outcome

__all__ = ["NOTIONAL", "VOLUME", "OrderSpikes", "order_amount"]

VOLUME: Final = "order_volume"
NOTIONAL: Final = "order_notional"
_PLACE: Final = "/PlaceOrder"
_ZERO: Final = Decimal(0)


def _amount(text: str | None) -> Decimal | None:
    if not text:
        return None
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() and value >= 0 else None


def order_amount(event: AuditEvent, measure: str) -> Decimal | None:
    """The amount an event adds to `measure` (VOLUME: its quantity; NOTIONAL: quantity x price); None when it is
    not an order placed (OK, PlaceOrder, by a guard) or has no such amount (see the module)."""
    if event.outcome is not Outcome.OK or not event.method.endswith(_PLACE) or not is_traffic(event):
        return None
    quantity = _amount(event.details.get("quantity"))
    if quantity is None or measure == VOLUME:
        return quantity
    price = _amount(event.details.get("price"))
    return None if price is None else quantity * price


@dataclass(slots=True)
class _Orders:
    baseline: Baseline  # its `count`: the orders in the current bucket
    total: Decimal = _ZERO  # their amounts' sum


class OrderSpikes(PerSubject[RateConfig, _Orders]):
    """The `order_volume` or `order_notional` detector (see the module)."""

    def __init__(self, name: str, config: RateConfig) -> None:
        if name not in (VOLUME, NOTIONAL):
            raise ValueError(f"not an order measure: {name!r}")
        super().__init__(config)
        self.name = name

    def observe(self, event: AuditEvent) -> list[Finding]:
        config = self.config
        if not config.enabled:
            return []
        amount = order_amount(event, self.name)
        if amount is None:
            return []
        findings: list[Finding] = []
        bucket = event.time_us // config.bucket_us
        for kind, rule in config.subjects.items():
            subject = subject_of(event, kind)
            if not subject:
                continue
            memory = self._subjects.of(kind)
            state = memory.setdefault(subject, lambda: _Orders(Baseline(bucket)))
            baseline = state.baseline
            later = bucket > baseline.bucket  # the bucket being summed closes with its total
            if not baseline.add(bucket, event.sequence, config.alpha, state.total):
                continue  # older than the bucket being summed: not counted
            state.total = amount if later else state.total + amount
            if (
                state.total < rule.amount
                or baseline.closed < config.warmup_buckets
                or baseline.alerted == bucket
            ):
                continue  # the amount threshold first: the cheapest test, and the one that holds most orders back
            limit = baseline.limit(config.sigmas)
            if float(state.total) <= limit:
                continue
            baseline.alerted = bucket
            self.alerts += 1
            what = "volume" if self.name == VOLUME else "notional"
            findings.append(
                finding(
                    self.name,
                    rule,
                    event,
                    subject_kind=kind,
                    subject=subject,
                    window_us=bucket * config.bucket_us,
                    summary=(
                        f"{kind} {subject}: order {what} {state.total} in {baseline.count} orders in "
                        f"{config.bucket_us // 1_000_000} s against a baseline of {baseline.mean:.1f}"
                    ),
                    evidence={
                        what: str(state.total),
                        "orders": str(baseline.count),
                        "mean": f"{baseline.mean:.3f}",
                        "spread": f"{math.sqrt(baseline.var):.3f}",
                        "limit": f"{limit:.1f}",
                        "threshold": str(rule.amount),
                        "bucket_s": str(config.bucket_us / 1_000_000),
                        "buckets_observed": str(baseline.closed),
                    },
                    sequences=tuple(baseline.recent),
                )
            )
        return findings
