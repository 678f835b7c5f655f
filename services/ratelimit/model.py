"""The rate limiter's types. Imports nothing else of the service.

**The semantics of a limit** (`Limit`): at most `count` units in ANY window of `window_us` microseconds — a sliding
window, never a fixed one. Units are counted in `buckets` sub-window buckets of `bucket_us = ceil(window_us /
buckets)` each, bucket index `now_us // bucket_us`. A check at time t counts the buckets `j - buckets .. j`
(j = t's bucket), which cover every unit of (t - window, t] — so a limit is NEVER exceeded in any window (zero error
on the safe side) — and possibly units of (t - (buckets + 1) * bucket_us, t - window] as well: a request refused
here that an exact sliding log would allow is refused only because of units less than one bucket older than the
window (exactly one bucket when `buckets` divides the window in µs; else up to `buckets - 1` µs more, from rounding
the bucket up to whole µs). That bound is the sliding-window counter's only error, and the property tests check it
against an exact log.
Memory: `buckets + 1` counters per (subject, limit), whatever the count (a 1,000,000-per-day quota costs the same as
10 per second).

Why not GCRA: GCRA (a token bucket) with a burst of `count` lets through up to `2 * count` units in one window
(the burst, then the refill) — a "1,000,000 per day" quota would pass about 2,000,000 in some 24 hours. Why not the
approximate sliding-window counter (two fixed windows, interpolated): up to twice the limit in a window when the
previous window's units were all at its end.

**A check** (`Evaluation`): every `Charge` (limit, units) of one request for one subject, evaluated atomically:
each charge fits when `counted + units <= count`; the request is allowed when every charge of a non-shadow limit
fits. Allowed → every charge is added (shadow limits too: they follow real traffic). Refused → only the charges of
limits with `consume_refused` are added. A peek (`consume=False`) adds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from tradeguard.ratelimit.names import limit_text

__all__ = [
    "DEFAULT_BUCKETS",
    "MAX_BATCH",
    "MAX_COST",
    "Charge",
    "Count",
    "Counted",
    "Decision",
    "Evaluation",
    "Limit",
    "LimitState",
    "LimitsConfig",
    "Operation",
    "Override",
    "QuotaRequest",
    "StoreUnavailable",
    "Tier",
]

MAX_COST: Final = 1_000_000  # units one request may ask for (before the operation's weight)
MAX_BATCH: Final = 1000  # checks per CheckQuotaBatch
DEFAULT_BUCKETS: Final = 20  # a limit's precision: its error bound is window / buckets
MAX_BUCKETS: Final = 120
MAX_WINDOW_US: Final = 31 * 86_400 * 1_000_000
MAX_COUNT: Final = 10**12


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `count` units in any window of `window_us` (see the module), for one operation group."""

    name: str
    group: str
    count: int
    window_us: int
    buckets: int = DEFAULT_BUCKETS
    shadow: bool = False  # decide, log and count, never refuse
    fail_open: bool = False  # when the counter store cannot answer in time: allow (True) or refuse (False)
    consume_refused: bool = False  # a refused request still counts against this limit

    @property
    def bucket_us(self) -> int:
        return -(-self.window_us // self.buckets)

    @property
    def counter_id(self) -> str:
        """The identity of this limit's counters: a changed window or precision starts new counters (old ones
        expire); a changed count or flag keeps them."""
        return f"{self.group}/{self.name}/{self.window_us}/{self.buckets}"

    @property
    def description(self) -> str:
        """For QuotaFailure and logs: "orders/per-second: 10 per 1s"."""
        return limit_text(self.group, self.name, self.count, self.window_us)


@dataclass(frozen=True, slots=True)
class Operation:
    """What one unit of cost of an operation weighs in each group it counts against (group → weight ≥ 1)."""

    name: str
    weights: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier's limits, per operation group."""

    name: str
    groups: Mapping[str, tuple[Limit, ...]]


@dataclass(frozen=True, slots=True)
class Override:
    """A subject's own terms: another tier, and/or its own limits for some groups (replacing the tier's)."""

    subject: str
    tier: str | None = None
    groups: Mapping[str, tuple[Limit, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class LimitsConfig:
    """A validated limits file (services/ratelimit/limits_file.py parses and checks it)."""

    default_tier: str
    tiers: Mapping[str, Tier]
    operations: Mapping[str, Operation]
    default_operation: Operation
    overrides: Mapping[str, Override] = field(default_factory=dict)
    source: str = ""
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class QuotaRequest:
    """One request to decide: `cost` units (times the operation's weights) of `operation` for `subject`."""

    subject: str
    tier: str
    operation: str
    cost: int = 1


@dataclass(frozen=True, slots=True)
class Charge:
    """`units` against `limit`."""

    limit: Limit
    units: int


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One request for the counters: its subject's charges, evaluated atomically (see the module)."""

    subject: str
    charges: tuple[Charge, ...]
    consume: bool = True


@dataclass(frozen=True, slots=True)
class Count:
    """One charge after its evaluation (times are absolute, µs since the epoch, on the store's clock)."""

    counted: int  # units in the window after this evaluation (including what it consumed)
    fits: bool  # counted-before + units <= count
    reset_us: int | None  # when the oldest counted units leave the window; None when nothing is counted
    retry_us: (
        int | None
    )  # when the same charge would first fit (== now when it fits); None: never (units > count)


@dataclass(frozen=True, slots=True)
class Counted:
    """What the counters made of one `Evaluation`."""

    allowed: bool  # every charge of a non-shadow limit fit
    consumed: bool  # the charges were added (allowed and consume)
    counts: tuple[Count, ...]  # one per charge, in order
    now_us: int  # the store's clock at evaluation


class StoreUnavailable(ConnectionError):
    """The counter store did not answer (in time): the limits' fail modes decide."""


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit as the caller is told it."""

    limit: Limit
    remaining: int
    reset_us: int | None
    exceeded: bool  # refused the request (or, shadow, would have)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a request came to."""

    allowed: bool
    tier: str  # the tier whose limits applied
    limits: tuple[LimitState, ...]
    now_us: int
    retry_after_us: int | None = None  # when refused: µs until the same request would be allowed; None: never
    store_unavailable: bool = False  # decided by the fail modes

    @property
    def refused_by(self) -> tuple[LimitState, ...]:
        """The enforcing (non-shadow) limits that refused it."""
        return tuple(s for s in self.limits if s.exceeded and not s.limit.shadow)
