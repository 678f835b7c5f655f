"""The sliding-window arithmetic (model.py states the semantics), in pure Python.

The in-process backend runs it as it is; the Redis backend's Lua script (counters_redis.py) computes what
`evaluate` computes, on a packed value per counter, and the contract tests (random runs included) hold both to
the same answers. A counter is `Window`: bucket
index → units, the buckets `j - n .. j` counted at bucket j (n = the limit's `buckets`), older ones pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.ratelimit.model import Charge, Count, Counted, Limit

__all__ = ["Window", "evaluate"]


@dataclass(slots=True)
class Window:
    """One (subject, limit) counter: units per bucket index."""

    counts: dict[int, int] = field(default_factory=dict)

    def prune(self, j: int, n: int) -> None:
        """Drop the buckets no longer counted at bucket `j` (older than `j - n`)."""
        stale = [k for k in self.counts if k < j - n]
        for k in stale:
            del self.counts[k]

    def counted(self, j: int, n: int) -> int:
        return sum(units for k, units in self.counts.items() if j - n <= k <= j)

    def reset_us(self, j: int, n: int, g: int) -> int | None:
        """When the oldest counted units leave the window: bucket k stops counting at bucket k + n + 1."""
        live = [k for k, units in self.counts.items() if j - n <= k <= j and units > 0]
        return None if not live else (min(live) + n + 1) * g

    def retry_us(self, limit: Limit, j: int, units: int, now_us: int) -> int | None:
        """When `units` would first fit (now if they do); None when they never can (more than the limit)."""
        n, g = limit.buckets, limit.bucket_us
        if units > limit.count:
            return None
        total = self.counted(j, n)
        need = total + units - limit.count
        if need <= 0:
            return now_us
        freed = 0
        for k in range(j - n, j + 1):
            freed += self.counts.get(k, 0)
            if freed >= need:
                return (k + n + 1) * g
        raise AssertionError("unreachable: freeing every counted unit always makes room")  # pragma: no cover

    @property
    def empty(self) -> bool:
        return not self.counts


def evaluate(charges: Sequence[Charge], windows: Sequence[Window], now_us: int, *, consume: bool) -> Counted:
    """One request's charges against their counters, atomically (the caller holds them for the duration):
    allowed when every non-shadow charge fits; allowed and `consume` → every charge added; refused and
    `consume` → only the `consume_refused` limits' charges added."""
    indices = [now_us // c.limit.bucket_us for c in charges]
    before = []
    for charge, window, j in zip(charges, windows, indices, strict=True):
        window.prune(j, charge.limit.buckets)
        before.append(window.counted(j, charge.limit.buckets))
    fits = [b + c.units <= c.limit.count for b, c in zip(before, charges, strict=True)]
    allowed = all(f for f, c in zip(fits, charges, strict=True) if not c.limit.shadow)
    counts = []
    for charge, window, j, b, fit in zip(charges, windows, indices, before, fits, strict=True):
        added = consume and (allowed or charge.limit.consume_refused)
        if added and charge.units:
            window.counts[j] = window.counts.get(j, 0) + charge.units
        n, g = charge.limit.buckets, charge.limit.bucket_us
        counts.append(
            Count(
                counted=b + (charge.units if added else 0),
                fits=fit,
                reset_us=window.reset_us(j, n, g),
                retry_us=now_us
                if fit and not added
                else window.retry_us(charge.limit, j, charge.units, now_us),
            )
        )
    return Counted(allowed=allowed, consumed=consume and allowed, counts=tuple(counts), now_us=now_us)
