"""The rate limiter's core: which limits a request hits, and the decision the counters come to. No grpc, no
protobuf, no Redis: the counters are a `Counters` backend, the limits a callable returning the config in force.

Resolution (`resolve`): the tier is the subject's override's tier if it has one, else the request's; an empty or
unknown tier is the limits file's `default_tier` (`Decision.tier` says which applied). The operation is looked up
by name, else the file's `default` operation. For each (group, weight) of the operation, each limit of the group
— the override's limits for that group if it has its own, else the tier's — is charged `weight * cost` units
(`cost` 0 means 1). Charges on one counter (`Limit.counter_id`) are merged, their units summed. A request with no
charges (every group of its operation unlimited) is allowed without asking the store.

Decision (`check`, one store round trip for the whole batch, bounded by `store_timeout_s`):
- the counters answered: allowed iff they allowed (every non-shadow limit fits); per limit `remaining = max(0,
  count - counted)`, its `reset_us`, `exceeded = not fits`. Refused: `retry_after_us` is the latest time at which
  a non-shadow charge of the request fits again (refused limits, and `consume_refused` limits the refusal filled)
  minus now — so the same request, retried then, passes if nothing else was counted meanwhile; None if a charge
  can never fit (more units than its limit).
- the store did not answer (`StoreUnavailable`, or no answer within `store_timeout_s`): allowed iff every
  non-shadow limit of the request is `fail: open`; `store_unavailable=True`; remaining is unknown and reported as 0
  with no reset; the fail-closed limits are the exceeded ones, and a refusal says retry after
  `STORE_RETRY_AFTER_US`. `store_failures` counts the requests so decided; the transitions are logged
  (`ratelimit.store_unavailable`, `ratelimit.store_recovered`), not each request.
- shadow limits never refuse; one that would have (on a consuming check) is logged (`ratelimit.shadow_exceeded`:
  subject, tier, operation, limit) and counted in `shadow_refusals`.

`validate` checks a request's fields (all of them at once, as `InvalidArgument` naming `<field>.subject`, ...);
`check` takes requests already validated. `reset(subject)` forgets the subject's counters of every limit it
could hit under the limits in force (every tier's, and its override's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final

from services.ratelimit.counters import Counters
from services.ratelimit.model import (
    MAX_COST,
    Charge,
    Count,
    Counted,
    Decision,
    Evaluation,
    Limit,
    LimitsConfig,
    LimitState,
    QuotaRequest,
    StoreUnavailable,
)
from tradeguard.errors import FieldViolation, InvalidArgument
from tradeguard.observability.logging import get_logger
from tradeguard.ratelimit.names import NAME_PATTERN, OPERATION_PATTERN, SUBJECT_PATTERN

__all__ = ["DEFAULT_STORE_TIMEOUT_S", "STORE_RETRY_AFTER_US", "RateLimiter"]

DEFAULT_STORE_TIMEOUT_S: Final = 0.05
STORE_RETRY_AFTER_US: Final = 1_000_000  # what a refusal by a fail-closed limit tells the caller to wait

_log = get_logger("ratelimit")


def _wall_clock_us() -> int:
    return time.time_ns() // 1000


class RateLimiter:
    """Decides quota requests against the limits in force and the counters (see the module)."""

    def __init__(
        self,
        limits: Callable[[], LimitsConfig],
        counters: Counters,
        *,
        store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S,
        clock_us: Callable[[], int] = _wall_clock_us,
    ) -> None:
        if not store_timeout_s > 0:
            raise ValueError("store_timeout_s must be positive")
        self._limits = limits
        self._counters = counters
        self._timeout_s = store_timeout_s
        self._clock_us = clock_us  # only for decisions the store did not time (unavailable, nothing to count)
        self._store_down = False
        self.shadow_refusals = 0
        self.store_failures = 0

    # --- requests -------------------------------------------------------------------------------------------

    def validate(self, request: QuotaRequest, field: str) -> None:
        """`InvalidArgument` naming every bad field of `request` (under `field`, e.g. "check")."""
        violations = []
        if not request.subject:
            violations.append(FieldViolation(f"{field}.subject", "required"))
        elif not SUBJECT_PATTERN.fullmatch(request.subject):
            violations.append(
                FieldViolation(f"{field}.subject", "1-128 characters of A-Z a-z 0-9 _ . : @ / - (no braces)")
            )
        if request.tier and not NAME_PATTERN.fullmatch(request.tier):
            violations.append(FieldViolation(f"{field}.tier", "not a tier name (a-z 0-9 _ -, up to 64)"))
        if not request.operation:
            violations.append(FieldViolation(f"{field}.operation", "required"))
        elif not OPERATION_PATTERN.fullmatch(request.operation):
            violations.append(
                FieldViolation(
                    f"{field}.operation", "1-200 characters of A-Z a-z 0-9 _ . : / - (/pkg.Svc/Method)"
                )
            )
        if not 0 <= request.cost <= MAX_COST:
            violations.append(FieldViolation(f"{field}.cost", f"must be 0..{MAX_COST} (0 means 1)"))
        if violations:
            raise InvalidArgument(violations)

    def resolve(self, request: QuotaRequest) -> tuple[str, tuple[Charge, ...]]:
        """The tier that applies to `request` and its charges (merged per counter)."""
        return _resolve(self._limits(), request)

    # --- decisions ------------------------------------------------------------------------------------------

    async def check(
        self, requests: Sequence[QuotaRequest], *, consume: bool = True, now_us: int | None = None
    ) -> list[Decision]:
        """One decision per request, in order; the requests with something to count go to the store in one batch.
        `consume=False` is a peek: nothing is counted. `now_us` None: the store's clock."""
        config = self._limits()
        resolved = [_resolve(config, request) for request in requests]
        asked = [i for i, (_, charges) in enumerate(resolved) if charges]
        batch = [Evaluation(requests[i].subject, resolved[i][1], consume) for i in asked]
        answers: list[Counted | StoreUnavailable]
        if not batch:
            answers = []
        else:
            try:
                answers = await asyncio.wait_for(self._counters.evaluate(batch, now_us), self._timeout_s)
            except (StoreUnavailable, TimeoutError) as error:
                answers = [StoreUnavailable(str(error) or "no answer in time")] * len(batch)
        by_index = dict(zip(asked, answers, strict=True))
        decisions = []
        failures = 0
        for i, (request, (tier, charges)) in enumerate(zip(requests, resolved, strict=True)):
            answer = by_index.get(i)
            if answer is None:
                now = self._clock_us() if now_us is None else now_us
                decisions.append(Decision(allowed=True, tier=tier, limits=(), now_us=now))
            elif isinstance(answer, StoreUnavailable):
                failures += 1
                decisions.append(self._unavailable(tier, charges, now_us))
            else:
                decisions.append(self._decided(request, tier, charges, answer, consume))
        self._store_health(failures, len(batch), answers)
        return decisions

    def _decided(
        self, request: QuotaRequest, tier: str, charges: tuple[Charge, ...], counted: Counted, consume: bool
    ) -> Decision:
        states = []
        for charge, count in zip(charges, counted.counts, strict=True):
            limit = charge.limit
            states.append(
                LimitState(
                    limit=limit,
                    remaining=max(0, limit.count - count.counted),
                    reset_us=count.reset_us,
                    exceeded=not count.fits,
                )
            )
            if limit.shadow and not count.fits and consume:
                self.shadow_refusals += 1
                _log.info(
                    "ratelimit.shadow_exceeded",
                    subject=request.subject,
                    tier=tier,
                    operation=request.operation,
                    limit=limit.description,
                )
        retry_after_us = None
        if not counted.allowed:
            retry_after_us = _retry_after(charges, counted.counts, counted.now_us)
        return Decision(
            allowed=counted.allowed,
            tier=tier,
            limits=tuple(states),
            now_us=counted.now_us,
            retry_after_us=retry_after_us,
        )

    def _unavailable(self, tier: str, charges: tuple[Charge, ...], now_us: int | None) -> Decision:
        enforcing = [c.limit for c in charges if not c.limit.shadow]
        allowed = all(limit.fail_open for limit in enforcing)
        states = tuple(
            LimitState(
                limit=c.limit,
                remaining=0,
                reset_us=None,
                exceeded=not c.limit.shadow and not c.limit.fail_open,
            )
            for c in charges
        )
        return Decision(
            allowed=allowed,
            tier=tier,
            limits=states,
            now_us=self._clock_us() if now_us is None else now_us,
            retry_after_us=None if allowed else STORE_RETRY_AFTER_US,
            store_unavailable=True,
        )

    def _store_health(self, failures: int, asked: int, answers: Sequence[Counted | StoreUnavailable]) -> None:
        self.store_failures += failures
        if not asked:
            return
        if failures == asked and not self._store_down:
            self._store_down = True
            reason = next((str(a) for a in answers if isinstance(a, StoreUnavailable)), "")
            _log.warning("ratelimit.store_unavailable", error=reason)
        elif failures < asked and self._store_down:
            self._store_down = False
            _log.info("ratelimit.store_recovered")

    # --- administration -------------------------------------------------------------------------------------

    def limits_for(self, subject: str) -> tuple[Limit, ...]:
        """Every limit `subject` could hit under the limits in force: every tier's, and its override's (one per
        counter)."""
        config = self._limits()
        seen: dict[str, Limit] = {}
        groups = [tier.groups for tier in config.tiers.values()]
        override = config.overrides.get(subject)
        if override is not None:
            groups.append(override.groups)
        for by_group in groups:
            for limits in by_group.values():
                for limit in limits:
                    seen.setdefault(limit.counter_id, limit)
        return tuple(seen.values())

    async def reset(self, subject: str) -> int:
        """Forget what `subject` consumed on every limit it could hit; how many counters held something."""
        return await self._counters.reset(subject, self.limits_for(subject))


def _resolve(config: LimitsConfig, request: QuotaRequest) -> tuple[str, tuple[Charge, ...]]:
    override = config.overrides.get(request.subject)
    tier_name = override.tier if override is not None and override.tier else request.tier
    if tier_name not in config.tiers:
        tier_name = config.default_tier
    tier = config.tiers[tier_name]
    operation = config.operations.get(request.operation, config.default_operation)
    cost = request.cost or 1
    merged: dict[str, Charge] = {}
    for group, weight in operation.weights.items():
        if override is not None and group in override.groups:
            limits = override.groups[group]
        else:
            limits = tier.groups.get(group, ())
        for limit in limits:
            held = merged.get(limit.counter_id)
            units = weight * cost + (held.units if held is not None else 0)
            merged[limit.counter_id] = Charge(held.limit if held is not None else limit, units)
    return tier_name, tuple(merged.values())


def _retry_after(charges: Sequence[Charge], counts: Sequence[Count], now_us: int) -> int | None:
    """µs until every non-shadow charge fits again (each count's `retry_us` is when its charge would fit, after
    what this evaluation added); None if one never can."""
    latest = now_us
    for charge, count in zip(charges, counts, strict=True):
        if charge.limit.shadow:
            continue
        if count.retry_us is None:
            return None
        latest = max(latest, count.retry_us)
    return latest - now_us
