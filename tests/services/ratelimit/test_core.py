"""The rate limiter's core (services/ratelimit/core.py) on the in-process counters and a fake clock: a per-second
burst limit and a per-day quota on one key both hold; weights and cost count; tiers, the default tier and
overrides resolve; shadow limits never refuse but are reported and counted; refused requests consume where asked;
fail-open and fail-closed limits when the store fails or never answers; the retry delay is exact; reset; and
validation naming every bad field."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ratelimit.core import STORE_RETRY_AFTER_US, RateLimiter
from services.ratelimit.counters import Counters
from services.ratelimit.counters_memory import MemoryCounters
from services.ratelimit.limits_file import parse_limits
from services.ratelimit.model import (
    MAX_COST,
    Counted,
    Decision,
    Evaluation,
    Limit,
    LimitsConfig,
    LimitState,
    Operation,
    QuotaRequest,
    StoreUnavailable,
    Tier,
)
from tradeguard.errors import InvalidArgument
from tradeguard.testing import FakeClock, LogCapture

S = 1_000_000
DAY = 86_400 * S
PLACE = "/t.v1.Trading/PlaceOrder"
LIST = "/t.v1.Trading/ListOrders"
HEAVY = "/t.v1.Trading/Heavy"
ORDERS_ONLY = "/t.v1.Trading/Amend"

LIMITS = f"""\
version: 1
default_tier: standard
operations:
  default: {{requests: 1}}
  {PLACE}: {{requests: 1, orders: 1}}
  {LIST}: {{requests: 5}}
  {HEAVY}: {{requests: 2, orders: 3}}
  {ORDERS_ONLY}: {{orders: 1}}
tiers:
  standard:
    requests:
      - {{name: per-second, limit: 10, window: 1s}}
      - {{name: per-day, limit: 100, window: 1d, buckets: 48}}
    orders:
      - {{name: per-second, limit: 3, window: 1s}}
  pro:
    requests:
      - {{name: per-second, limit: 100, window: 1s}}
    orders: []
overrides:
  "key:vip": {{tier: pro}}
  "user:capped": {{groups: {{orders: [{{name: per-minute, limit: 1, window: 1m}}]}}}}
"""


class Limits:
    """The limits in force, swappable as the reloader swaps them."""

    def __init__(self, text: str = LIMITS) -> None:
        self.config = parse_limits(text, "limits.yaml")

    def __call__(self) -> LimitsConfig:
        return self.config


class CountingCounters:
    """The in-process counters, counting the store calls."""

    def __init__(self, inner: MemoryCounters) -> None:
        self.inner = inner
        self.calls: list[int] = []

    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]:
        self.calls.append(len(batch))
        return await self.inner.evaluate(batch, now_us)

    async def reset(self, subject: str, limits: Sequence[Limit]) -> int:
        return await self.inner.reset(subject, limits)

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        await self.inner.close()


class DownCounters:
    """A store that is down: every call raises StoreUnavailable."""

    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]:
        raise StoreUnavailable("connection refused")

    async def reset(self, subject: str, limits: Sequence[Limit]) -> int:
        raise StoreUnavailable("connection refused")

    async def healthy(self) -> bool:
        return False

    async def close(self) -> None:
        return None


class SilentCounters:
    """A store that never answers (a black-holed connection)."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def reset(self, subject: str, limits: Sequence[Limit]) -> int:
        return 0

    async def healthy(self) -> bool:
        return False

    async def close(self) -> None:
        return None


def made(
    text: str = LIMITS, *, counters: Counters | None = None, clock: FakeClock | None = None
) -> tuple[RateLimiter, FakeClock]:
    clock = clock or FakeClock()
    limiter = RateLimiter(
        Limits(text), counters if counters is not None else MemoryCounters(clock), clock_us=clock
    )
    return limiter, clock


async def decide(
    limiter: RateLimiter,
    subject: str = "key:k1",
    operation: str = "/t.v1.Trading/GetOrder",
    *,
    tier: str = "standard",
    cost: int = 1,
    consume: bool = True,
) -> Decision:
    (decision,) = await limiter.check([QuotaRequest(subject, tier, operation, cost)], consume=consume)
    return decision


def state(decision: Decision, group: str, name: str) -> LimitState:
    (found,) = [s for s in decision.limits if (s.limit.group, s.limit.name) == (group, name)]
    return found


def names(states: Sequence[LimitState]) -> list[str]:
    return [f"{s.limit.group}/{s.limit.name}" for s in states]


# --- limits that hold -----------------------------------------------------------------------------------------


async def test_a_per_second_burst_and_a_per_day_quota_on_one_key_both_hold() -> None:
    limiter, clock = made()
    allowed: list[int] = []
    refused_by: set[str] = set()
    step = S // 15  # 15 attempts a second against 10 per second
    for _ in range(15 * 40):  # 40 seconds: the day's 100 are used up after about 10
        decision = await decide(limiter)
        if decision.allowed:
            allowed.append(decision.now_us)
        else:
            refused_by.update(names(decision.refused_by))
        clock.advance(step)
    for t in allowed:  # never more than 10 in any second
        assert sum(1 for u in allowed if t - S < u <= t) <= 10
    assert len(allowed) == 100  # and exactly the day's quota in all
    assert refused_by == {"requests/per-second", "requests/per-day"}
    # the quota refuses until its first units leave the day's window (within a bucket of 30 minutes)
    decision = await decide(limiter)
    assert names(decision.refused_by) == ["requests/per-day"]
    assert decision.retry_after_us is not None
    first_bucket_end = (allowed[0] // (DAY // 48) + 48 + 1) * (DAY // 48)
    assert decision.now_us + decision.retry_after_us == first_bucket_end
    clock.advance(decision.retry_after_us - 1)
    assert not (await decide(limiter, consume=False)).allowed
    clock.advance(1)
    assert (await decide(limiter)).allowed


async def test_weights_count() -> None:
    limiter, _ = made()
    first = await decide(limiter, operation=LIST)  # weight 5 against 10 per second
    assert first.allowed
    assert state(first, "requests", "per-second").remaining == 5
    assert state(first, "requests", "per-day").remaining == 95
    assert (await decide(limiter, operation=LIST)).allowed
    third = await decide(limiter, operation=LIST)
    assert not third.allowed
    assert names(third.refused_by) == ["requests/per-second"]
    per_second = state(third, "requests", "per-second")
    assert (per_second.remaining, per_second.exceeded) == (0, True)
    assert per_second.reset_us == third.now_us - third.now_us % (S // 20) + S + S // 20  # first bucket leaves
    assert state(third, "requests", "per-day") == LimitState(
        state(third, "requests", "per-day").limit,
        remaining=90,
        reset_us=state(first, "requests", "per-day").reset_us,
        exceeded=False,
    )
    assert not (await decide(limiter)).allowed  # a weight-1 call has no room left either


async def test_cost_multiplies_the_weights() -> None:
    limiter, _ = made()
    tier, charges = limiter.resolve(QuotaRequest("key:k1", "standard", HEAVY, cost=2))
    assert tier == "standard"
    assert [(c.limit.group, c.limit.name, c.units) for c in charges] == [
        ("requests", "per-second", 4),
        ("requests", "per-day", 4),
        ("orders", "per-second", 6),
    ]
    _, zero = limiter.resolve(QuotaRequest("key:k1", "standard", HEAVY, cost=0))  # 0 means 1
    assert [c.units for c in zero] == [2, 2, 3]

    placed = await decide(limiter, operation=PLACE, cost=3)  # 3 orders of 3 per second
    assert placed.allowed
    assert state(placed, "orders", "per-second").remaining == 0
    assert state(placed, "requests", "per-second").remaining == 7
    never = await decide(limiter, "key:k2", HEAVY, cost=2)  # 6 orders can never fit 3 per second
    assert not never.allowed
    assert names(never.refused_by) == ["orders/per-second"]
    assert never.retry_after_us is None
    assert state(never, "requests", "per-second") == LimitState(
        state(never, "requests", "per-second").limit, remaining=10, reset_us=None, exceeded=False
    )  # all or nothing: the requests the refusal did not consume


async def test_unlisted_operations_take_the_default() -> None:
    limiter, _ = made()
    _, charges = limiter.resolve(QuotaRequest("key:k1", "", "/other.Service/Anything"))
    assert [(c.limit.group, c.units) for c in charges] == [("requests", 1), ("requests", 1)]


# --- tiers and overrides -------------------------------------------------------------------------------------


async def test_the_tier_applies_and_an_empty_or_unknown_one_is_the_default() -> None:
    limiter, _ = made()
    pro = await decide(limiter, operation=PLACE, tier="pro")
    assert pro.tier == "pro"
    assert names(pro.limits) == ["requests/per-second"]  # pro's orders are `[]`: unlimited
    assert pro.limits[0].remaining == 99
    for tier in ("", "gold"):
        decision = await decide(limiter, f"key:{tier or 'none'}", PLACE, tier=tier)
        assert decision.tier == "standard"
        assert names(decision.limits) == ["requests/per-second", "requests/per-day", "orders/per-second"]


async def test_a_request_with_nothing_to_count_is_allowed_without_the_store() -> None:
    clock = FakeClock()
    counters = CountingCounters(MemoryCounters(clock))
    limiter, _ = made(counters=counters, clock=clock)
    decision = await decide(limiter, operation=ORDERS_ONLY, tier="pro")
    assert decision == Decision(allowed=True, tier="pro", limits=(), now_us=clock())
    assert counters.calls == []


async def test_an_override_sets_the_tier_and_replaces_groups() -> None:
    limiter, _ = made()
    vip = await decide(limiter, "key:vip", PLACE, tier="")  # its own tier, whatever the request says
    assert vip.tier == "pro"
    assert (await decide(limiter, "key:vip", PLACE, tier="standard")).tier == "pro"

    capped = await decide(limiter, "user:capped", PLACE)
    assert capped.allowed
    assert capped.tier == "standard"
    assert names(capped.limits) == ["requests/per-second", "requests/per-day", "orders/per-minute"]
    again = await decide(limiter, "user:capped", PLACE)
    assert names(again.refused_by) == ["orders/per-minute"]
    assert (
        await decide(limiter, "user:capped")
    ).allowed  # the tier's requests limits still apply, not orders


async def test_charges_on_one_counter_are_merged() -> None:
    shared = Limit("shared", "x", 5, S)
    config = LimitsConfig(
        default_tier="t",
        tiers={"t": Tier("t", {"a": (shared,), "b": (shared,)})},
        operations={},
        default_operation=Operation("default", {"a": 1, "b": 2}),
    )
    clock = FakeClock()
    limiter = RateLimiter(lambda: config, MemoryCounters(clock), clock_us=clock)
    _, charges = limiter.resolve(QuotaRequest("key:k1", "", "op"))
    assert [(c.limit, c.units) for c in charges] == [(shared, 3)]
    assert (await decide(limiter, operation="op")).limits[0].remaining == 2


async def test_the_limits_in_force_are_read_at_every_check() -> None:
    clock = FakeClock()
    limits = Limits()
    limiter = RateLimiter(limits, MemoryCounters(clock), clock_us=clock)
    assert (await decide(limiter, operation=LIST)).limits[0].remaining == 5
    limits.config = parse_limits(LIMITS.replace("limit: 10, window: 1s", "limit: 20, window: 1s"), "x")
    assert (await decide(limiter, operation=LIST)).limits[0].remaining == 10  # same counter, new count


# --- shadow limits, refused requests -------------------------------------------------------------------------

SHADOW = LIMITS.replace(
    "      - {name: per-second, limit: 10, window: 1s}\n",
    "      - {name: per-second, limit: 10, window: 1s}\n      - {name: trial, limit: 2, window: 1m, shadow: true}\n",
)


async def test_a_shadow_limit_never_refuses_but_is_reported_and_counted() -> None:
    limiter, _ = made(SHADOW)
    logs = LogCapture()
    decisions = [await decide(limiter) for _ in range(5)]
    assert all(d.allowed for d in decisions)
    assert [state(d, "requests", "trial").exceeded for d in decisions] == [False, False, True, True, True]
    assert all(d.refused_by == () and d.retry_after_us is None for d in decisions)
    assert limiter.shadow_refusals == 3
    lines = [line for line in logs.lines() if line["event"] == "ratelimit.shadow_exceeded"]
    assert len(lines) == 3
    assert lines[0]["subject"] == "key:k1"
    assert lines[0]["limit"] == "requests/trial: 2 per 1m"
    assert lines[0]["tier"] == "standard"
    peek = await decide(limiter, consume=False)  # a peek reports it, without counting it
    assert state(peek, "requests", "trial").exceeded
    assert limiter.shadow_refusals == 3


async def test_a_shadow_limit_does_not_change_the_retry_delay() -> None:
    limiter, _ = made(SHADOW)
    for _ in range(10):
        assert (await decide(limiter)).allowed
    refused = await decide(limiter)
    assert names(refused.refused_by) == ["requests/per-second"]
    assert refused.retry_after_us is not None and refused.retry_after_us <= S + S // 20


async def test_refused_requests_consume_where_asked() -> None:
    text = LIMITS.replace(
        "{name: per-second, limit: 3, window: 1s}",
        "{name: per-second, limit: 3, window: 1s, consume_refused: true}",
    )
    limiter, clock = made(text)
    for _ in range(3):
        assert (await decide(limiter, operation=PLACE)).allowed
    clock.advance(S // 2)
    refused = await decide(limiter, operation=PLACE)  # counted even though refused
    assert names(refused.refused_by) == ["orders/per-second"]
    assert state(refused, "requests", "per-second").remaining == 7  # all-or-nothing for the others
    assert refused.retry_after_us is not None
    clock.advance(S // 2 + S // 20)  # the first three left the window; the refused one has not
    assert state(await decide(limiter, operation=PLACE, consume=False), "orders", "per-second").remaining == 2
    # retried exactly when told, the same request passes
    limiter2, clock2 = made(text)
    for _ in range(3):
        await decide(limiter2, operation=PLACE)
    told = await decide(limiter2, operation=PLACE)
    assert told.retry_after_us is not None
    clock2.advance(told.retry_after_us)
    assert (await decide(limiter2, operation=PLACE)).allowed


# --- the retry delay -----------------------------------------------------------------------------------------


async def test_the_retry_delay_covers_a_consume_refused_limit_the_refusal_filled() -> None:
    text = LIMITS.replace(
        "{name: per-second, limit: 3, window: 1s}",
        "{name: per-second, limit: 3, window: 1s, consume_refused: true}",
    )
    limiter, clock = made(text)
    for _ in range(8):
        assert (await decide(limiter)).allowed  # requests 8 of 10
    clock.advance(S // 2)
    for _ in range(2):
        assert (await decide(limiter, operation=PLACE)).allowed  # requests 10 of 10, orders 2 of 3
    clock.advance(S * 4 // 10)
    refused = await decide(limiter, operation=PLACE)
    assert names(refused.refused_by) == ["requests/per-second"]
    # orders fitted, and the refusal filled it (3 of 3): the retry waits for the orders of 0.5 s to leave, not
    # only for the requests of 0 s
    assert state(refused, "orders", "per-second").remaining == 0
    assert refused.retry_after_us == S // 2 + S + S // 20 - (S // 2 + S * 4 // 10)
    clock.advance(refused.retry_after_us - 1)
    assert not (await decide(limiter, operation=PLACE, consume=False)).allowed
    clock.advance(1)
    assert (await decide(limiter, operation=PLACE)).allowed


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.just(0) | st.integers(0, S // 4) | st.integers(0, 3 * S),  # time to the next request
            st.sampled_from(["/x", PLACE, LIST, HEAVY]),
            st.integers(0, 3),  # cost
        ),
        min_size=1,
        max_size=40,
    )
)
async def test_waiting_the_retry_delay_lets_the_same_request_through(
    steps: list[tuple[int, str, int]],
) -> None:
    """Also when a refusal filled a `consume_refused` limit that the request fitted: the delay covers it."""
    text = LIMITS.replace(
        "{name: per-second, limit: 3, window: 1s}",
        "{name: per-second, limit: 3, window: 2s, consume_refused: true, buckets: 7}",
    )
    limiter, clock = made(text)
    for gap, operation, cost in steps:
        clock.advance(gap)
        decision = await decide(limiter, operation=operation, cost=cost)
        if decision.allowed or decision.retry_after_us is None:
            continue
        assert decision.retry_after_us > 0
        clock.advance(decision.retry_after_us - 1)
        assert not (await decide(limiter, operation=operation, cost=cost, consume=False)).allowed
        clock.advance(1)
        assert (await decide(limiter, operation=operation, cost=cost, consume=False)).allowed


# --- the store failing ---------------------------------------------------------------------------------------

FAIL_MODES = LIMITS.replace(
    "{name: per-second, limit: 10, window: 1s}", "{name: per-second, limit: 10, window: 1s, fail: open}"
).replace(
    "{name: per-day, limit: 100, window: 1d, buckets: 48}",
    "{name: per-day, limit: 100, window: 1d, buckets: 48, fail: open}",
)
# requests: both fail open; orders: fail closed


async def test_a_store_down_allows_fail_open_limits_and_refuses_fail_closed_ones() -> None:
    limiter, clock = made(FAIL_MODES, counters=DownCounters())
    logs = LogCapture()
    reads = await decide(limiter)  # requests only: every limit fails open
    assert reads.allowed and reads.store_unavailable
    assert reads.now_us == clock()
    assert [(s.remaining, s.reset_us, s.exceeded) for s in reads.limits] == [
        (0, None, False),
        (0, None, False),
    ]
    assert reads.retry_after_us is None
    orders = await decide(limiter, operation=PLACE)  # orders fail closed
    assert not orders.allowed and orders.store_unavailable
    assert names(orders.refused_by) == ["orders/per-second"]
    assert orders.retry_after_us == STORE_RETRY_AFTER_US
    assert limiter.store_failures == 2
    assert [line["event"] for line in logs.lines() if line["event"].startswith("ratelimit.store")] == [
        "ratelimit.store_unavailable"
    ]  # the transition, not every request
    with pytest.raises(StoreUnavailable):
        await limiter.reset("key:k1")


async def test_a_shadow_limit_does_not_decide_when_the_store_is_down() -> None:
    text = FAIL_MODES.replace(
        "      - {name: per-second, limit: 3, window: 1s}\n",
        "      - {name: per-second, limit: 3, window: 1s, shadow: true}\n",
    )
    limiter, _ = made(text, counters=DownCounters())
    assert (await decide(limiter, operation=PLACE)).allowed


async def test_a_store_that_never_answers_is_given_up_on_after_the_timeout() -> None:
    counters = SilentCounters()
    clock = FakeClock()
    limiter = RateLimiter(Limits(FAIL_MODES), counters, store_timeout_s=0.05, clock_us=clock)
    async with asyncio.timeout(300):  # only so that a broken timeout fails instead of hanging the suite
        reads, orders = await limiter.check(
            [QuotaRequest("key:k1", "", "/x"), QuotaRequest("key:k2", "", PLACE)]
        )
    assert (reads.allowed, reads.store_unavailable) == (True, True)
    assert (orders.allowed, orders.store_unavailable) == (False, True)
    assert (counters.started, counters.cancelled) == (1, 1)  # one batch, abandoned
    assert limiter.store_failures == 2


async def test_one_evaluation_the_store_could_not_run_is_decided_by_the_fail_modes_alone() -> None:
    clock = FakeClock()
    memory = MemoryCounters(clock, max_counters=3)  # room for one subject's three counters
    logs = LogCapture()
    limiter, _ = made(FAIL_MODES, counters=memory, clock=clock)
    first, second = await limiter.check([QuotaRequest("key:a", "", PLACE), QuotaRequest("key:b", "", PLACE)])
    assert first.allowed and not first.store_unavailable
    assert not second.allowed and second.store_unavailable
    assert limiter.store_failures == 1
    assert not [line for line in logs.lines() if line["event"] == "ratelimit.store_unavailable"]


async def test_the_store_coming_back_is_logged_once() -> None:
    clock = FakeClock()

    class Flaky(CountingCounters):
        down = True

        async def evaluate(
            self, batch: Sequence[Evaluation], now_us: int | None = None
        ) -> list[Counted | StoreUnavailable]:
            if self.down:
                raise StoreUnavailable("down")
            return await super().evaluate(batch, now_us)

    counters = Flaky(MemoryCounters(clock))
    limiter, _ = made(FAIL_MODES, counters=counters, clock=clock)
    logs = LogCapture()
    for _ in range(3):
        assert (await decide(limiter)).store_unavailable
    counters.down = False
    for _ in range(3):
        assert not (await decide(limiter)).store_unavailable
    events = [line["event"] for line in logs.lines() if line["event"].startswith("ratelimit.store")]
    assert events == ["ratelimit.store_unavailable", "ratelimit.store_recovered"]


# --- batches, reset ------------------------------------------------------------------------------------------


async def test_a_batch_is_one_store_call_and_one_decision_per_request_in_order() -> None:
    clock = FakeClock()
    counters = CountingCounters(MemoryCounters(clock))
    limiter, _ = made(counters=counters, clock=clock)
    requests = [QuotaRequest(f"key:k{i % 3}", "", LIST) for i in range(9)]
    requests.insert(4, QuotaRequest("key:k9", "pro", ORDERS_ONLY))  # nothing to count
    decisions = await limiter.check(requests)
    assert counters.calls == [9]
    assert [d.allowed for d in decisions] == [True] * 7 + [False] * 3  # each subject's third is refused
    assert decisions[4].limits == ()
    peek = await limiter.check(requests[:1], consume=False)
    assert peek[0].limits[0].remaining == 0 and not peek[0].allowed


async def test_reset_forgets_every_limit_the_subject_could_hit() -> None:
    text = LIMITS.replace(
        "{name: per-second, limit: 100, window: 1s}", "{name: burst, limit: 100, window: 1s}"
    )
    limiter, _ = made(text)
    for _ in range(3):
        await decide(limiter, "key:k1", PLACE)
    await decide(limiter, "key:k1", tier="pro")  # another tier's counter
    await decide(limiter, "key:k2", PLACE)
    assert not (await decide(limiter, "key:k1", PLACE)).allowed
    assert await limiter.reset("key:k1") == 4  # standard's three, pro's one
    assert (await decide(limiter, "key:k1", PLACE)).allowed
    assert state(await decide(limiter, "key:k2", PLACE, consume=False), "orders", "per-second").remaining == 2
    assert await limiter.reset("key:nobody") == 0


def test_the_limits_of_a_subject_are_every_tier_s_and_its_override_s_one_per_counter() -> None:
    limiter, _ = made()
    plain = limiter.limits_for("key:k1")
    # pro's requests/per-second counts on standard's counter (same name, window and buckets: a tier change keeps
    # what was counted), so it is one limit here
    assert [f"{limit.group}/{limit.name}" for limit in plain] == [
        "requests/per-second",
        "requests/per-day",
        "orders/per-second",
    ]
    capped = [f"{limit.group}/{limit.name}" for limit in limiter.limits_for("user:capped")]
    assert capped == [f"{limit.group}/{limit.name}" for limit in plain] + ["orders/per-minute"]


async def test_reset_of_an_override_subject_clears_its_own_limits() -> None:
    limiter, _ = made()
    await decide(limiter, "user:capped", PLACE)
    assert not (await decide(limiter, "user:capped", PLACE)).allowed
    assert await limiter.reset("user:capped") == 3  # requests/per-second, per-day, orders/per-minute
    assert (await decide(limiter, "user:capped", PLACE)).allowed


# --- validation ----------------------------------------------------------------------------------------------


def test_validation_names_every_bad_field_at_once() -> None:
    limiter, _ = made()
    with pytest.raises(InvalidArgument) as caught:
        limiter.validate(QuotaRequest("", "Gold Tier", "", -1), "check")
    assert [v.field for v in caught.value.violations] == [
        "check.subject",
        "check.tier",
        "check.operation",
        "check.cost",
    ]
    bad: list[tuple[QuotaRequest, str]] = [
        (QuotaRequest("key:{x}", "", "/x"), "checks[3].subject"),  # a brace would break the cluster hash tag
        (QuotaRequest("k" * 129, "", "/x"), "checks[3].subject"),
        (QuotaRequest("key:k", "t" * 65, "/x"), "checks[3].tier"),
        (QuotaRequest("key:k", "", "/x y"), "checks[3].operation"),
        (QuotaRequest("key:k", "", "/" * 201), "checks[3].operation"),
        (QuotaRequest("key:k", "", "/x", MAX_COST + 1), "checks[3].cost"),
    ]
    for request, field in bad:
        with pytest.raises(InvalidArgument) as one:
            limiter.validate(request, "checks[3]")
        assert [v.field for v in one.value.violations] == [field]
    for good in (QuotaRequest("key:k", "", "/x", 0), QuotaRequest("user:u@x/y", "pro", PLACE, MAX_COST)):
        limiter.validate(good, "check")


def test_a_store_timeout_must_be_positive() -> None:
    kwargs: dict[str, Any] = {"store_timeout_s": 0}
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(Limits(), MemoryCounters(FakeClock()), **kwargs)
