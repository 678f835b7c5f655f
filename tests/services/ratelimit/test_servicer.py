"""RateLimitService over mutual TLS, the service started as production starts it (tradeguard.service.start) with
in-process counters on a fake clock: every RPC, validation errors naming fields, the mesh policy, the batching of
concurrent CheckQuota calls into one store round trip, GetLimits and the hot reload.

The helpers here (`LIMITS`, `ratelimit_service`, `Ratelimit`, `CountingCounters`) also serve test_rls.py and the
command line's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.ratelimit import policy
from services.ratelimit.core import RateLimiter
from services.ratelimit.counters import Counters
from services.ratelimit.counters_memory import MemoryCounters
from services.ratelimit.model import MAX_BATCH, Counted, Evaluation, StoreUnavailable
from services.ratelimit.service import SERVICE, builder
from services.ratelimit.servicer import RateLimitServicer
from services.ratelimit.settings import Settings
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc
from tradeguard.testing import FakeClock, RunningService, eventually, rich_status, running_service

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
LIST = "/tradeguard.trading.v1.TradingService/ListOrders"
SECOND_US = 1_000_000

# Tiers and groups the tests reason about: `requests` 10 per minute (ListOrders weighs 5), `orders` 2 per second
# and 100 per day; pro: 100 requests per minute and orders unlimited; a shadow limit; overrides by subject;
# `open`/`closed` groups for the fail modes.
LIMITS = """\
version: 1
default_tier: standard
operations:
  default: {requests: 1}
  /tradeguard.trading.v1.TradingService/PlaceOrder: {requests: 1, orders: 1}
  /tradeguard.trading.v1.TradingService/ListOrders: {requests: 5}
  /test.v1.Fail/Open: {open: 1}
  /test.v1.Fail/Closed: {closed: 1}
  /test.v1.Fail/Both: {open: 1, closed: 1}
tiers:
  standard:
    requests:
      - {name: per-minute, limit: 10, window: 1m}
      - {name: per-10s, limit: 3, window: 10s, shadow: true}
    orders:
      - {name: per-second, limit: 2, window: 1s}
      - {name: per-day, limit: 100, window: 1d, buckets: 48}
    open:
      - {name: per-hour, limit: 1000, window: 1h, fail: open}
    closed:
      - {name: per-hour, limit: 1000, window: 1h}
  pro:
    requests:
      - {name: per-minute, limit: 100, window: 1m}
    orders: []
    open: []
    closed: []
overrides:
  "key:vip": {tier: pro}
  "user:special":
    groups:
      orders: [{name: per-second, limit: 5, window: 1s}]
"""


class CountingCounters(MemoryCounters):
    """The in-process counters, counting store batches (`evaluate` calls); `hold` (when set) keeps the next batch
    at the store until it is released, so that a test can queue calls behind it; `down` makes the store fail."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.batches: list[int] = []  # evaluations per batch, in order
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()  # the held batch has reached the store
        self.down = False

    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]:
        self.batches.append(len(batch))
        if self.down:
            raise StoreUnavailable("the test's store is down")
        hold, self.hold = self.hold, None
        if hold is not None:
            self.held.set()
            await hold.wait()
        return await super().evaluate(batch, now_us)

    async def healthy(self) -> bool:
        return not self.down


@dataclass
class Ratelimit:
    """A running rate-limit service and what a test needs of it."""

    service: RunningService[Settings, Any]
    paths: pki.PkiPaths
    counters: CountingCounters
    clock: FakeClock
    limits_file: Path

    @property
    def target(self) -> str:
        return self.service.target

    @property
    def limiter(self) -> RateLimiter:
        core = self.service.running.core
        assert isinstance(core, RateLimiter)
        return core

    @property
    def servicer(self) -> RateLimitServicer:
        servicer = self.service.running.assembly.servicer
        assert isinstance(servicer, RateLimitServicer)
        return servicer

    @contextlib.asynccontextmanager
    async def stub(self, caller: str = "ops") -> AsyncIterator[ratelimit_pb2_grpc.RateLimitServiceAsyncStub]:
        async with self.service.channel(caller) as channel:
            yield ratelimit_pb2_grpc.RateLimitServiceStub(channel)


def write_limits(path: Path, text: str) -> None:
    """A new version of the limits file, as an operator's deploy writes it: whole, by rename (a file written in
    place can be read half-written by a reload in between: its own tests are in tests/tradeguard/test_reload.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(text)
    staged.chmod(0o600)
    os.replace(staged, path)


@contextlib.asynccontextmanager
async def ratelimit_service(
    paths: pki.PkiPaths, limits: str = LIMITS, *, clock: FakeClock | None = None, **overrides: Any
) -> AsyncIterator[Ratelimit]:
    """The service (its real declaration, built over `CountingCounters` on `clock`, by default a new `FakeClock`)
    on a free port, its limits file written under the PKI's home; `overrides` are Settings fields."""
    if not paths.cert("ratelimit").exists():
        pki.issue(paths, "ratelimit")
    home = paths.home
    limits_file = home / "config" / "limits.yaml"
    write_limits(limits_file, limits)
    clock = clock or FakeClock()
    counters = CountingCounters(clock)

    async def counters_for(_: Settings) -> Counters:
        return counters

    settings = Settings(
        server=ServerConfig(name="ratelimit", port=0, home=home, grace_s=0.5),
        database_url="",
        limits_file=limits_file,
        **overrides,
    )
    declaration = replace(SERVICE, build=builder(counters_for, clock))
    async with running_service(declaration, settings, paths) as running:
        yield Ratelimit(running, paths, counters, clock, limits_file)


@pytest.fixture
async def ratelimit(pki_paths: pki.PkiPaths) -> AsyncIterator[Ratelimit]:
    async with ratelimit_service(pki_paths) as running:
        yield running


def check(subject: str, operation: str = PLACE, *, tier: str = "", cost: int = 0) -> pb.QuotaCheck:
    return pb.QuotaCheck(subject=subject, tier=tier, operation=operation, cost=cost)


def limits_by_name(decision: pb.QuotaDecision) -> dict[str, pb.LimitStatus]:
    return {f"{s.group}/{s.name}": s for s in decision.limits}


async def refused(call: Any) -> tuple[grpc.StatusCode, dict[str, str]]:
    """The status code and the field violations (field → description) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = rich_status(info.value)
    return status.code, {v.field: v.description for v in status.field_violations}


# --- CheckQuota ----------------------------------------------------------------------------------------------


async def test_check_quota_consumes_and_refuses_past_a_limit_with_the_retry_delay(
    ratelimit: Ratelimit,
) -> None:
    async with ratelimit.stub() as stub:
        first = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:k1")))).decision
        assert first.allowed and first.tier == "standard" and not first.store_unavailable
        states = limits_by_name(first)
        assert set(states) == {
            "requests/per-minute",
            "requests/per-10s",
            "orders/per-second",
            "orders/per-day",
        }
        per_second = states["orders/per-second"]
        assert (per_second.limit, per_second.remaining, per_second.exceeded) == (2, 1, False)
        assert per_second.window.seconds == 1 and not per_second.shadow
        assert states["requests/per-10s"].shadow
        # reset: when the unit counted now leaves the window (its bucket + the window, on the store's clock)
        assert per_second.reset_time.ToMicroseconds() > ratelimit.clock()
        assert per_second.reset_time.ToMicroseconds() <= ratelimit.clock() + 2 * SECOND_US
        assert not first.HasField("retry_after")

        second = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:k1")))).decision
        assert second.allowed and limits_by_name(second)["orders/per-second"].remaining == 0
        third = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:k1")))).decision
        assert not third.allowed
        assert limits_by_name(third)["orders/per-second"].exceeded
        assert not limits_by_name(third)["orders/per-day"].exceeded
        assert limits_by_name(third)["orders/per-day"].remaining == 98  # the refused request consumed nothing
        assert third.HasField("retry_after")
        assert 0 < third.retry_after.ToMicroseconds() <= 2 * SECOND_US

        ratelimit.clock.advance(third.retry_after.ToMicroseconds())
        again = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:k1")))).decision
        assert again.allowed


async def test_weights_tiers_overrides_and_cost(ratelimit: Ratelimit) -> None:
    async with ratelimit.stub() as stub:
        listed = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:u1", LIST)))).decision
        assert limits_by_name(listed)["requests/per-minute"].remaining == 5  # ListOrders weighs 5
        assert "orders/per-second" not in limits_by_name(listed)
        costly = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:u1", LIST, cost=2)))).decision
        assert not costly.allowed  # 2 x 5 = 10 units, 5 left

        pro = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:u2", tier="pro")))).decision
        assert pro.tier == "pro" and set(limits_by_name(pro)) == {"requests/per-minute"}
        unknown = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:u3", tier="gold")))).decision
        assert unknown.tier == "standard"  # an unknown tier: the default tier
        vip = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:vip")))).decision
        assert vip.tier == "pro"  # the override's tier, whatever the caller said
        special = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:special")))).decision
        assert limits_by_name(special)["orders/per-second"].limit == 5
        assert "orders/per-day" not in limits_by_name(special)  # the override's limits replace the group's

        other = await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:u4", "/pkg.Other/Method")))
        assert set(limits_by_name(other.decision)) == {"requests/per-minute", "requests/per-10s"}  # default


async def test_a_shadow_limit_never_refuses_and_is_counted(ratelimit: Ratelimit) -> None:
    async with ratelimit.stub() as stub:
        for _ in range(5):  # per-10s is 3, in shadow
            decision = (await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:sh", "x")))).decision
            assert decision.allowed
        shadow = limits_by_name(decision)["requests/per-10s"]
        assert shadow.exceeded and shadow.shadow and shadow.remaining == 0
    assert ratelimit.limiter.shadow_refusals == 2


async def test_check_quota_names_every_bad_field(ratelimit: Ratelimit) -> None:
    async with ratelimit.stub() as stub:
        code, fields = await refused(stub.CheckQuota(pb.CheckQuotaRequest()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(fields) == {"check.subject", "check.operation"}
        bad = pb.QuotaCheck(subject="key:{x}", tier="Gold Tier", operation="no spaces", cost=2_000_000)
        code, fields = await refused(stub.CheckQuota(pb.CheckQuotaRequest(check=bad)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(fields) == {"check.subject", "check.tier", "check.operation", "check.cost"}
    assert ratelimit.counters.batches == []  # nothing reached the store


async def test_concurrent_check_quota_calls_share_store_round_trips(pki_paths: pki.PkiPaths) -> None:
    """64 concurrent unary calls: the first goes at once (no added latency; with any that arrived in the same
    event-loop turn), the others queue behind it while it is at the store and go together: two store round trips,
    not 64."""
    # a store timeout long enough that the held batch is not decided by the fail modes meanwhile
    async with ratelimit_service(pki_paths, store_timeout_s=120.0) as ratelimit, ratelimit.stub() as stub:
        ratelimit.counters.hold = hold = asyncio.Event()
        calls = [
            asyncio.ensure_future(stub.CheckQuota(pb.CheckQuotaRequest(check=check(f"user:b{i}", "x"))))
            for i in range(64)
        ]
        await ratelimit.counters.held.wait()
        batches = ratelimit.counters.batches
        await eventually(lambda: batches[0] + ratelimit.servicer.batcher.pending == 64, 60)
        hold.set()
        replies = await asyncio.gather(*calls)
    assert all(reply.decision.allowed for reply in replies)
    assert len(batches) == 2 and sum(batches) == 64, batches
    assert ratelimit.servicer.batcher.batches == 2


async def test_with_the_store_down_each_limit_s_fail_mode_decides(ratelimit: Ratelimit) -> None:
    ratelimit.counters.down = True
    async with ratelimit.stub() as stub:
        checks = [check("user:f", "/test.v1.Fail/Open"), check("user:f", "/test.v1.Fail/Closed")]
        checks.append(check("user:f", "/test.v1.Fail/Both"))
        opened, closed, both = (
            await stub.CheckQuotaBatch(pb.CheckQuotaBatchRequest(checks=checks))
        ).decisions
        single = await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:f", "/test.v1.Fail/Closed")))
    assert opened.allowed and opened.store_unavailable and not opened.HasField("retry_after")
    assert (
        not closed.allowed and closed.store_unavailable and closed.retry_after.ToMicroseconds() == SECOND_US
    )
    assert not both.allowed  # one fail-closed limit is enough to refuse
    assert single.decision == closed
    for decision in (opened, closed, both):
        for state in decision.limits:
            assert state.remaining == 0 and not state.HasField("reset_time")  # unknown
    assert ratelimit.limiter.store_failures == 4
    ratelimit.counters.down = False
    async with ratelimit.stub() as stub:
        back = await stub.CheckQuota(pb.CheckQuotaRequest(check=check("user:f", "/test.v1.Fail/Closed")))
    assert back.decision.allowed and not back.decision.store_unavailable


# --- CheckQuotaBatch -----------------------------------------------------------------------------------------


async def test_check_quota_batch_decides_each_in_order_in_one_round_trip(ratelimit: Ratelimit) -> None:
    async with ratelimit.stub("trading") as stub:
        checks = [check("key:kb"), check("key:kb"), check("key:kb"), check("user:other", LIST)]
        reply = await stub.CheckQuotaBatch(pb.CheckQuotaBatchRequest(checks=checks))
    assert [d.allowed for d in reply.decisions] == [True, True, False, True]
    assert ratelimit.counters.batches == [4]


async def test_check_quota_batch_validation(ratelimit: Ratelimit) -> None:
    async with ratelimit.stub() as stub:
        code, fields = await refused(stub.CheckQuotaBatch(pb.CheckQuotaBatchRequest()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"checks"}
        too_many = [check(f"user:u{i}") for i in range(MAX_BATCH + 1)]
        code, fields = await refused(stub.CheckQuotaBatch(pb.CheckQuotaBatchRequest(checks=too_many)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000" in fields["checks"]
        mixed = [check("user:ok"), check("", PLACE), check("user:ok", ""), pb.QuotaCheck(subject="a b")]
        code, fields = await refused(stub.CheckQuotaBatch(pb.CheckQuotaBatchRequest(checks=mixed)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(fields) == {
            "checks[1].subject",
            "checks[2].operation",
            "checks[3].subject",
            "checks[3].operation",
        }
    assert ratelimit.counters.batches == []


# --- GetQuota, ResetSubject ----------------------------------------------------------------------------------


async def test_get_quota_consumes_nothing_and_reset_forgets(ratelimit: Ratelimit) -> None:
    async with ratelimit.stub() as stub:
        await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:kr")))
        for _ in range(3):
            got = (await stub.GetQuota(pb.GetQuotaRequest(check=check("key:kr")))).decision
            assert got.allowed and limits_by_name(got)["orders/per-second"].remaining == 1
        await stub.CheckQuota(pb.CheckQuotaRequest(check=check("key:kr")))
        peek = (await stub.GetQuota(pb.GetQuotaRequest(check=check("key:kr")))).decision
        assert not peek.allowed and peek.HasField("retry_after")

        reset = await stub.ResetSubject(pb.ResetSubjectRequest(subject="key:kr"))
        assert reset.counters_cleared == 4  # requests/per-minute, per-10s, orders/per-second, per-day
        fresh = (await stub.GetQuota(pb.GetQuotaRequest(check=check("key:kr")))).decision
        assert fresh.allowed and limits_by_name(fresh)["orders/per-day"].remaining == 100
        assert (await stub.ResetSubject(pb.ResetSubjectRequest(subject="key:kr"))).counters_cleared == 0

        code, fields = await refused(stub.GetQuota(pb.GetQuotaRequest(check=check("user:x", "", cost=0))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"check.operation"}
        for subject in ("", "key:{tag}", "x" * 129, "user:a b"):
            code, fields = await refused(stub.ResetSubject(pb.ResetSubjectRequest(subject=subject)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"subject"}


# --- GetLimits and the hot reload ----------------------------------------------------------------------------


async def test_get_limits_reports_the_file_in_force_and_a_bad_reload(pki_paths: pki.PkiPaths) -> None:
    async with ratelimit_service(pki_paths, reload_interval_s=0.01) as ratelimit:
        limits = ratelimit.servicer.limits
        async with ratelimit.stub("monitor") as stub:
            first = await stub.GetLimits(pb.GetLimitsRequest())
            assert first.source == str(ratelimit.limits_file)
            assert len(first.sha256) == 64 and first.last_error == ""
            assert list(first.tiers) == ["pro", "standard"]
            assert first.loaded_time.ToMicroseconds() == ratelimit.clock()

            write_limits(ratelimit.limits_file, LIMITS.replace("window: 1m}", "window: 3x}", 1))
            await eventually(lambda: "tiers.standard.requests[0].window" in limits.last_error, 30)
            kept = await stub.GetLimits(pb.GetLimitsRequest())
            assert "tiers.standard.requests[0].window" in kept.last_error and "'3x'" in kept.last_error
            assert kept.sha256 == first.sha256 and list(kept.tiers) == ["pro", "standard"]
            assert kept.loaded_time == first.loaded_time
        async with ratelimit.stub() as ops:  # the last good limits still decide
            decision = (await ops.CheckQuota(pb.CheckQuotaRequest(check=check("user:r")))).decision
            assert decision.allowed and limits_by_name(decision)["requests/per-minute"].limit == 10

            ratelimit.clock.advance_s(5)
            write_limits(
                ratelimit.limits_file, LIMITS.replace("limit: 10, window: 1m", "limit: 12, window: 1m")
            )
            await eventually(lambda: limits.current.sha256 != first.sha256, 30)
            fixed = await ops.GetLimits(pb.GetLimitsRequest())
            assert fixed.last_error == "" and fixed.sha256 != first.sha256
            assert fixed.loaded_time.ToMicroseconds() == ratelimit.clock()
            decision = (await ops.CheckQuota(pb.CheckQuotaRequest(check=check("user:r")))).decision
            per_minute = limits_by_name(decision)["requests/per-minute"]
            assert (per_minute.limit, per_minute.remaining) == (12, 10)  # same counters, the new count


# --- who may call what ---------------------------------------------------------------------------------------


def _requests() -> dict[str, tuple[str, Any]]:
    return {
        "CheckQuota": ("CheckQuota", pb.CheckQuotaRequest(check=check("user:p"))),
        "CheckQuotaBatch": ("CheckQuotaBatch", pb.CheckQuotaBatchRequest(checks=[check("user:p")])),
        "GetQuota": ("GetQuota", pb.GetQuotaRequest(check=check("user:p"))),
        "ResetSubject": ("ResetSubject", pb.ResetSubjectRequest(subject="user:p")),
        "GetLimits": ("GetLimits", pb.GetLimitsRequest()),
    }


ALLOWED = {
    "CheckQuota": {"ops", "trading"},
    "CheckQuotaBatch": {"ops", "trading"},
    "GetQuota": {"ops", "monitor"},
    "ResetSubject": {"ops"},
    "GetLimits": {"ops", "monitor"},
}


def test_the_policy_is_the_brief_s_and_guard_workloads_extend_only_the_deciding_methods() -> None:
    rules = policy.rules()
    for method, callers in ALLOWED.items():
        assert rules[f"{policy.SERVICE}/{method}"] == callers
    assert rules[policy.RLS] == {"edge"}
    extended = policy.rules(frozenset({"desk"}))
    assert extended[f"{policy.SERVICE}/CheckQuota"] == {"ops", "trading", "desk"}
    assert extended[f"{policy.SERVICE}/CheckQuotaBatch"] == {"ops", "trading", "desk"}
    assert extended[f"{policy.SERVICE}/GetQuota"] == ALLOWED["GetQuota"]
    assert extended[f"{policy.SERVICE}/ResetSubject"] == {"ops"}
    assert policy.rules() == policy.RULES  # extending returns a copy, never changes the table


async def test_the_mesh_admits_only_the_policy_s_workloads(pki_paths: pki.PkiPaths) -> None:
    async with ratelimit_service(pki_paths, guard_workloads=frozenset({"echo"})) as ratelimit:
        for caller in ("ops", "trading", "monitor", "edge", "auth", "echo"):
            async with ratelimit.stub(caller) as stub:
                for method, (name, request) in _requests().items():
                    call = getattr(stub, name)(request, timeout=30)
                    allowed = ALLOWED[method] | ({"echo"} if method.startswith("CheckQuota") else set())
                    if caller in allowed:
                        await call
                    else:
                        code, _ = await refused(call)
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (caller, method)
