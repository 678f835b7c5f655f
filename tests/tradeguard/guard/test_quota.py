"""The guard's quota stage against the REAL rate-limit service (a process, tests/support.py TEST_LIMITS) and the real
auth service: limits, weights, subjects, the order of the stages, the check beside the auth RPC, failing closed,
batching."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.ratelimit import model
from tests.conftest import RunningTrading
from tests.support import (
    LIST_ORDERS_WEIGHT,
    TIGHT_ORDERS_PER_HOUR,
    TIGHT_REQUESTS_PER_HOUR,
    TIGHT_TIER,
    AuthServices,
    create_api_key,
    create_auth_user,
    log_in,
    stop_process,
    wait_healthy,
)
from tests.tradeguard.guard.conftest import COLLECT, ECHO_METHOD, Guarded, guarded_echo
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.errors import QuotaViolation, ResourceExhausted, Unavailable
from tradeguard.guard import GuardConfig, GuardSettings, QuotaStage, guard_for
from tradeguard.guard import quota as quota_module
from tradeguard.guard.audit import AuditStage
from tradeguard.guard.client import ApiKeyCredentials, bearer_interceptors, signing_interceptors
from tradeguard.guard.quota import QuotaCheck, limit_description
from tradeguard.mesh import pki, tls
from tradeguard.principal import Principal
from tradeguard.ratelimit.v1 import ratelimit_pb2 as rl_pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc
from tradeguard.settings import Env, SettingsError
from tradeguard.testing import LogCapture, RichStatus, eventually, rich_status
from tradeguard.trading.v1 import trading_pb2

HOUR_S = 3600.0


def stub(channel: grpc.aio.Channel) -> echo_pb2_grpc.EchoServiceAsyncStub:
    return echo_pb2_grpc.EchoServiceStub(channel)


async def refused(call: Awaitable[Any]) -> RichStatus:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return rich_status(failed.value)


async def counted(auth: AuthServices, subject: str, operation: str, limit: str, tier: str = "") -> int:
    """What the rate-limit service has counted for `subject` against the limit named `limit` ("group/name") of
    `operation` under `tier` (GetQuota as `ops`: nothing consumed; for limits whose window outlasts the test)."""
    async with auth.ratelimit_channel("ops") as channel:
        reply = await ratelimit_pb2_grpc.RateLimitServiceStub(channel).GetQuota(
            rl_pb.GetQuotaRequest(check=rl_pb.QuotaCheck(subject=subject, tier=tier, operation=operation)),
            timeout=10,
        )
    for status in reply.decision.limits:
        if f"{status.group}/{status.name}" == limit:
            return int(status.limit - status.remaining)
    raise AssertionError(f"no limit {limit} in {reply.decision}")


async def _texts(texts: Sequence[str]) -> Any:
    for text in texts:
        yield echo_pb2.CollectRequest(text=text)


# --- over the limit ------------------------------------------------------------------------------------------


async def test_a_tight_key_is_refused_after_its_limit_with_retry_info_quota_failure_and_retry_after(
    guarded: Guarded,
) -> None:
    _, key = await guarded.key(tier=TIGHT_TIER)
    subject = f"key:{key.key_id}"
    logs = LogCapture()
    async with guarded.channel(signing_interceptors(key)) as channel:
        for index in range(TIGHT_REQUESTS_PER_HOUR):
            await stub(channel).Echo(echo_pb2.EchoRequest(text=str(index)), timeout=10)
        status = await refused(stub(channel).Echo(echo_pb2.EchoRequest(text="one more"), timeout=10))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and status.reason == "RATE_LIMITED"
    description = f"requests/per-hour: {TIGHT_REQUESTS_PER_HOUR} per 1h"
    assert status.message == description
    assert status.quota_violations == (QuotaViolation(subject, description),)
    # counted in buckets of a 20th of the window: the oldest counted units may be up to one bucket older
    assert status.retry_delay_s is not None and 0 < status.retry_delay_s <= HOUR_S * (1 + 1 / 20)
    assert status.retry_after_s == max(1, math.ceil(status.retry_delay_s))  # whole seconds, rounded up
    # a refused call consumed nothing: still exactly the limit counted
    hour = await counted(guarded.auth, subject, ECHO_METHOD, "requests/per-hour", TIGHT_TIER)
    assert hour == TIGHT_REQUESTS_PER_HOUR
    lines = await logs.settled_rpc_lines(TIGHT_REQUESTS_PER_HOUR + 1, ECHO_METHOD)
    assert lines[-1]["quota"] == "exhausted" and lines[-1]["quota_limit"] == description
    assert {line["quota"] for line in lines[:-1]} == {"allowed"}
    assert key.secret is not None and key.secret not in logs.text


async def test_a_call_that_can_never_pass_waits_for_the_longest_refusing_window(guarded: Guarded) -> None:
    """Collect weighs 20 units of `heavy`, beyond the tight tier's 5 per hour: the service gives no retry delay
    (none would help); the guard tells the caller the longest refusing window."""
    _, key = await guarded.key(tier=TIGHT_TIER)
    async with guarded.channel(signing_interceptors(key)) as channel:
        status = await refused(stub(channel).Collect(_texts(["a"]), timeout=10))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.retry_delay_s == HOUR_S and status.retry_after_s == int(HOUR_S)
    assert status.quota_violations == (QuotaViolation(f"key:{key.key_id}", "heavy/per-hour: 5 per 1h"),)


async def test_weights_and_groups_count_on_the_trading_service(trading: RunningTrading) -> None:
    """The reference trading service's guard counts by default: ListOrders weighs 5 requests; PlaceOrder counts
    against `orders` as well as `requests`."""
    user = await create_auth_user(trading.auth, "acct-1")
    lister = await create_api_key(trading.auth, user.user_id, tier=TIGHT_TIER)
    placer = await create_api_key(trading.auth, user.user_id, tier=TIGHT_TIER)
    allowed_lists = TIGHT_REQUESTS_PER_HOUR // LIST_ORDERS_WEIGHT
    trading.key = lister
    async with trading.channel() as channel:
        orders = trading.stub(channel)
        for _ in range(allowed_lists):
            await orders.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10)
        status = await refused(orders.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [v.description for v in status.quota_violations] == [
        f"requests/per-hour: {TIGHT_REQUESTS_PER_HOUR} per 1h"
    ]
    trading.key = placer
    async with trading.channel() as channel:
        orders = trading.stub(channel)
        for index in range(TIGHT_ORDERS_PER_HOUR):
            await orders.PlaceOrder(_order(f"q-{index}"), timeout=10)
        status = await refused(orders.PlaceOrder(_order("q-over"), timeout=10))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [v.description for v in status.quota_violations] == [
        f"orders/per-hour: {TIGHT_ORDERS_PER_HOUR} per 1h"
    ]


def _order(coid: str) -> trading_pb2.PlaceOrderRequest:
    return trading_pb2.PlaceOrderRequest(
        account_id="acct-1",
        client_order_id=coid,
        symbol="BTC-USD",
        side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT,
        quantity="1",
        price="100",
    )


# --- who is counted, and when --------------------------------------------------------------------------------


async def test_bearer_token_calls_are_counted_by_user_whatever_the_token(guarded: Guarded) -> None:
    user, first = await guarded.token(("viewer",))  # no second factor: logged in twice below
    _, second_user_token = await guarded.token(("viewer",))
    second = await log_in(guarded.services, user)  # another login of the same user: another token
    subject = f"user:{user.user_id}"
    logs = LogCapture()
    async with (
        guarded.channel(bearer_interceptors(first)) as one,
        guarded.channel(bearer_interceptors(second)) as other,
        guarded.channel(bearer_interceptors(second_user_token)) as someone_else,
    ):
        for channel in (one, one, one, other, other):
            await stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
        await stub(someone_else).Echo(echo_pb2.EchoRequest(), timeout=10)
    assert await counted(guarded.auth, subject, ECHO_METHOD, "requests/per-day") == 5
    lines = await logs.settled_rpc_lines(6, ECHO_METHOD)
    assert {(line["quota"], line["quota_path"]) for line in lines} == {("allowed", "after_auth")}
    assert first not in logs.text and second not in logs.text


async def test_a_call_refused_for_permission_spends_no_quota(guarded: Guarded) -> None:
    user, token = await guarded.token(("viewer",))  # orders:read only
    _, key = await guarded.key(scopes="orders:read")
    quota = guarded.guard.quota
    assert quota is not None
    async with (
        guarded.channel(bearer_interceptors(token)) as by_token,
        guarded.channel(signing_interceptors(key)) as by_key,
    ):
        assert (
            await refused(stub(by_token).Collect(_texts(["a"])))
        ).code == grpc.StatusCode.PERMISSION_DENIED
        await stub(by_key).Echo(echo_pb2.EchoRequest(), timeout=10)  # the key's tier and scopes now known
        early = quota.concurrent_checks
        assert (await refused(stub(by_key).Collect(_texts(["a"])))).code == grpc.StatusCode.PERMISSION_DENIED
        assert quota.concurrent_checks == early  # its scopes lack the permission: never started beside auth
    assert await counted(guarded.auth, f"user:{user.user_id}", COLLECT, "requests/per-day") == 0
    assert await counted(guarded.auth, f"key:{key.key_id}", COLLECT, "requests/per-day") == 1  # the Echo


async def test_a_known_key_is_checked_beside_the_auth_rpc_and_auths_refusal_wins(guarded: Guarded) -> None:
    _, key = await guarded.key(tier=TIGHT_TIER)
    quota = guarded.guard.quota
    assert quota is not None
    forged = ApiKeyCredentials(key.key_id, secret="tgs_" + "x" * 40)
    logs = LogCapture()
    async with (
        guarded.channel(signing_interceptors(key)) as channel,
        guarded.channel(signing_interceptors(forged)) as forging,
        guarded.channel(signing_interceptors(forged), caller="trading-client") as elsewhere,
    ):
        before = quota.concurrent_checks
        await stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)  # tier unknown: after authentication
        assert quota.concurrent_checks == before
        assert quota.known(key.key_id, _spiffe(guarded, "ops")) == TIGHT_TIER
        for _ in range(TIGHT_REQUESTS_PER_HOUR - 1):  # the rest of the hour's quota, beside auth
            await stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
        assert quota.concurrent_checks == before + TIGHT_REQUESTS_PER_HOUR - 1
        over = await refused(stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10))
        assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a forged signature on the concurrent path, over the limit as well: auth's verdict is the caller's
        status = await refused(stub(forging).Echo(echo_pb2.EchoRequest(), timeout=10))
        assert status.code == grpc.StatusCode.UNAUTHENTICATED and status.quota_violations == ()
        assert quota.concurrent_checks == before + TIGHT_REQUESTS_PER_HOUR + 1
        # from another workload the key is not known: checked only after authentication, which refuses it
        status = await refused(stub(elsewhere).Echo(echo_pb2.EchoRequest(), timeout=10))
        assert status.code == grpc.StatusCode.UNAUTHENTICATED
        assert quota.concurrent_checks == before + TIGHT_REQUESTS_PER_HOUR + 1
    lines = await logs.settled_rpc_lines(TIGHT_REQUESTS_PER_HOUR + 3, ECHO_METHOD)
    paths = [line.get("quota_path") for line in lines]
    assert paths == ["after_auth", *["concurrent"] * TIGHT_REQUESTS_PER_HOUR, None, None]
    assert [line.get("quota") for line in lines[-2:]] == [None, None]  # refused by auth: no quota outcome


def _spiffe(guarded: Guarded, workload: str) -> str:
    return f"spiffe://{pki.trust_domain(guarded.paths)}/svc/{workload}"


async def test_a_tier_that_changed_is_checked_again_under_the_verified_one(guarded: Guarded) -> None:
    """The cache said `standard`; auth verifies the key as tight: the early verdict is dropped, the call is
    checked under the verified tier (and the cache learns it)."""
    _, key = await guarded.key(tier=TIGHT_TIER)
    quota = guarded.guard.quota
    assert quota is not None
    caller = _spiffe(guarded, "ops")
    quota.remember(
        Principal("u", "a", frozenset({"orders:read"}), tier="standard", key_id=key.key_id), caller
    )
    async with guarded.channel(signing_interceptors(key)) as channel:
        checks = quota.checks
        await stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
    assert quota.checks == checks + 2  # the early one (discarded) and the one under the verified tier
    assert quota.known(key.key_id, caller) == TIGHT_TIER


async def test_unmetered_methods_and_edge_calls_are_not_counted(
    pki_paths: pki.PkiPaths, auth: AuthServices
) -> None:
    async with guarded_echo(pki_paths, auth, unmetered=[ECHO_METHOD]) as guarded:
        quota = guarded.guard.quota
        assert quota is not None
        _, key = await guarded.key(tier=TIGHT_TIER)
        async with guarded.channel(signing_interceptors(key)) as channel:
            for _ in range(TIGHT_REQUESTS_PER_HOUR + 2):
                await stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
        edge = (("x-tg-principal", "usr_9"), ("x-tg-account", "acct-9"), ("x-tg-scopes", "orders:write"))
        async with guarded.echo.channel("edge") as by_edge:
            collected = await stub(by_edge).Collect(_texts(["a"]), metadata=edge, timeout=10)
            assert collected.count == 1  # Envoy's rate-limit filter counted it
        assert quota.checks == 0 and quota.batcher.batches == 0


# --- failing closed -------------------------------------------------------------------------------------------


async def _code(call: Callable[[], Awaitable[Any]]) -> grpc.StatusCode:
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def until_code(call: Callable[[], Awaitable[Any]], expected: grpc.StatusCode, within_s: float) -> None:
    """Make `call` again and again until it ends with `expected` (a state to reach, like `eventually`)."""
    last: list[grpc.StatusCode] = []

    async def attempt() -> None:
        while True:
            code = await _code(call)
            last.append(code)
            if code == expected:
                return
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(attempt(), within_s)
    except TimeoutError:
        raise AssertionError(f"not {expected} within {within_s} s; last {last[-3:]}") from None


async def test_the_guard_fails_closed_while_the_rate_limiter_is_down_and_recovers(
    pki_paths: pki.PkiPaths, auth: AuthServices
) -> None:
    process, target = auth.start_ratelimit("ratelimit-outage")
    port = int(target.rsplit(":", 1)[1])
    log = auth.paths.home / "ratelimit-outage.log"
    ops = tls.Workload.of(auth.paths, "ops")
    restarted = None
    try:
        await wait_healthy(process, target, "ratelimit", ops, log)
        async with guarded_echo(pki_paths, auth, ratelimit_target=target) as guarded:
            user, token = await guarded.token(("trader",))
            logs = LogCapture()
            async with guarded.channel(bearer_interceptors(token)) as channel:

                def echo() -> Awaitable[echo_pb2.EchoResponse]:
                    return stub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)

                assert (await echo()).text.startswith(f"{user.user_id}|")
                await asyncio.to_thread(stop_process, process)
                await until_code(echo, grpc.StatusCode.UNAVAILABLE, 30)
                status = await refused(echo())
                assert status.code == grpc.StatusCode.UNAVAILABLE
                assert status.message == "rate-limit service unavailable"
                line = (await logs.settled_rpc_lines(3, ECHO_METHOD))[-1]
                assert line["quota"] == "unavailable" and "rate-limit service failed" in line["quota_cause"]
                assert token not in logs.text
                restarted, _ = auth.start_ratelimit("ratelimit-outage", port=port)
                await wait_healthy(restarted, target, "ratelimit", ops, log)
                await until_code(echo, grpc.StatusCode.OK, 60)  # the channel reconnects on its own
    finally:
        for proc in (process, restarted):
            if proc is not None:
                await asyncio.to_thread(stop_process, proc)


async def test_a_full_queue_or_an_uncountable_subject_is_unavailable_without_a_call(
    pki_paths: pki.PkiPaths, auth: AuthServices
) -> None:
    async with auth.ratelimit_channel("echo") as channel:
        stage = QuotaStage(channel, max_pending=1)
        try:
            bad = Principal("user with spaces", "a", frozenset(), tier="")
            with pytest.raises(Unavailable, match="rate-limit service unavailable"):
                await stage.check(bad, ECHO_METHOD)
            assert stage.rpcs == 0
            # a tier the service would refuse as malformed goes as the default tier, not as a poisoned batch
            await stage.check(Principal("u-odd-tier", "a", frozenset(), tier="Not A Tier!"), ECHO_METHOD)
            assert stage.rpcs == 1
            # one batch held on its way, one call queued behind it: a third is refused at once, never queued
            run = stage.batcher._run_batch
            release = asyncio.Event()

            async def held(items: Sequence[QuotaCheck]) -> Any:
                await release.wait()
                return await run(items)

            stage.batcher._run_batch = held
            who = Principal("u-queue", "a", frozenset(), tier="")
            first = asyncio.ensure_future(stage.check(who, ECHO_METHOD))
            await eventually(lambda: stage.batcher.batches == 2)
            second = asyncio.ensure_future(stage.check(who, ECHO_METHOD))
            await eventually(lambda: stage.batcher.pending == 1)
            with pytest.raises(Unavailable):
                await stage.check(who, ECHO_METHOD)
            release.set()
            await asyncio.gather(first, second)
            assert stage.unavailable == 2
        finally:
            await stage.close()


# --- batching ---------------------------------------------------------------------------------------------------


async def test_concurrent_calls_share_batch_calls(guarded: Guarded) -> None:
    """Calls that arrive while a CheckQuotaBatch is in flight go together as the next one. The burst's first batch
    is held (on its way to the real service) until the rest have queued behind it, so the count does not depend
    on this machine's speed."""
    user, token = await guarded.token(("trader",))
    quota = guarded.guard.quota
    assert quota is not None
    batcher = quota.batcher
    check = batcher._run_batch
    held: list[int] = []

    async def holding_the_first(items: Sequence[QuotaCheck]) -> Any:
        if not held:
            held.append(len(items))
            await eventually(lambda: len(items) + batcher.pending == 64, 30)
        return await check(items)

    async with guarded.channel(bearer_interceptors(token)) as channel:
        echo = stub(channel)
        await echo.Echo(echo_pb2.EchoRequest())  # the token verified and cached
        rpcs = quota.rpcs
        batcher._run_batch = holding_the_first
        replies = await asyncio.gather(*(echo.Echo(echo_pb2.EchoRequest(text=str(i))) for i in range(64)))
    assert all(r.text.startswith(f"{user.user_id}|") for r in replies)
    assert quota.rpcs - rpcs == 2, f"{quota.rpcs - rpcs} CheckQuotaBatch calls for 64 concurrent calls"
    assert batcher.largest_batch == max(held[0], 64 - held[0])
    assert await counted(guarded.auth, f"user:{user.user_id}", ECHO_METHOD, "requests/per-day") == 65


# --- configuration and the rate limiter's own definitions -------------------------------------------------------


def test_settings_and_configuration_mistakes() -> None:
    assert GuardSettings().quota and GuardSettings().ratelimit_target == "127.0.0.1:50052"
    read = GuardSettings.read(Env("TG_X", {"TG_X_QUOTA": "false", "TG_X_RATELIMIT_TARGET": "10.0.0.5:7000"}))
    assert not read.quota and read.ratelimit_target == "10.0.0.5:7000"
    with pytest.raises(SettingsError, match="TG_X_QUOTA"):
        GuardSettings.read(Env("TG_X", {"TG_X_QUOTA": "maybe"}))
    from tradeguard.guard.layer import Guard

    with pytest.raises(ValueError, match="unmetered methods that are not guarded"):
        Guard(
            trust_domain="t",
            services=["a.B"],
            permissions={"/a.B/M": "orders:read"},
            unmetered=["/a.B/N"],
            jwt=None,  # type: ignore[arg-type]
            signed=None,  # type: ignore[arg-type]
            revocations=None,  # type: ignore[arg-type]
        )


async def test_quota_off_builds_no_stage(pki_paths: pki.PkiPaths) -> None:
    pki.issue(pki_paths, "desk")
    guard = guard_for(
        GuardConfig(
            services=["a.B"], permissions={"/a.B/M": "orders:read"}, settings=GuardSettings(quota=False)
        ),
        workload=tls.Workload.of(pki_paths, "desk"),
        trust_domain=pki.trust_domain(pki_paths),
    )
    try:
        assert guard.quota is None and guard.layer.quota is None and guard.quota_channel is None
    finally:
        await guard.close()


@given(
    seconds=st.integers(min_value=1, max_value=31 * 86_400),
    count=st.integers(min_value=1, max_value=model.MAX_COUNT),
)
def test_a_limit_is_described_as_the_rate_limiter_describes_it(seconds: int, count: int) -> None:
    limit = model.Limit(name="per-x", group="requests", count=count, window_us=seconds * 1_000_000)
    status = rl_pb.LimitStatus(
        name=limit.name, group=limit.group, limit=count, window=duration_pb2.Duration(seconds=seconds)
    )
    assert limit_description(status) == limit.description


def test_a_refusal_names_every_refusing_limit_and_the_tightest() -> None:
    def status(name: str, window_s: int, remaining: int, *, exceeded: bool, shadow: bool = False) -> Any:
        return rl_pb.LimitStatus(
            name=name,
            group="requests",
            limit=10,
            window=duration_pb2.Duration(seconds=window_s),
            remaining=remaining,
            exceeded=exceeded,
            shadow=shadow,
        )

    decision = rl_pb.QuotaDecision(
        allowed=False,
        limits=[
            status("per-second", 1, 0, exceeded=True),
            status("per-day", 86_400, 0, exceeded=True),
            status("per-hour", 3600, 4, exceeded=True),
            status("shadow", 60, 0, exceeded=True, shadow=True),
            status("per-minute", 60, 2, exceeded=False),
        ],
        retry_after=duration_pb2.Duration(seconds=7, nanos=250_000_000),
    )
    verdict = quota_module._verdict("key:k", decision)
    error = verdict.error
    assert isinstance(error, ResourceExhausted)
    assert error.limit_description == "requests/per-day: 10 per 1d"  # fewest remaining, the longer window
    assert error.retry_after_seconds == 7.25
    assert [v.description for v in error.violations] == [
        "requests/per-second: 10 per 1s",
        "requests/per-day: 10 per 1d",
        "requests/per-hour: 10 per 1h",
    ]
    outage = rl_pb.QuotaDecision(allowed=False, store_unavailable=True)
    assert quota_module._verdict("key:k", outage).outcome == "unavailable"
    assert quota_module._verdict("key:k", rl_pb.QuotaDecision(allowed=False)).outcome == "unavailable"


async def test_the_batch_fill_turns_setting_reaches_the_auth_quota_and_audit_batchers(
    pki_paths: pki.PkiPaths,
) -> None:
    assert GuardSettings().fill_turns == GuardSettings.read(Env("TG_X", {})).fill_turns == 25
    assert GuardSettings().fill_patience == GuardSettings.read(Env("TG_X", {})).fill_patience == 0
    read = GuardSettings.read(Env("TG_X", {"TG_X_BATCH_FILL_TURNS": "0", "TG_X_BATCH_FILL_PATIENCE": "2"}))
    assert read.fill_turns == 0 and read.fill_patience == 2
    for name in ("BATCH_FILL_TURNS", "BATCH_FILL_PATIENCE"):
        for bad in ("-1", "101", "many"):
            with pytest.raises(SettingsError, match=f"TG_X_{name}"):
                GuardSettings.read(Env("TG_X", {f"TG_X_{name}": bad}))
    pki.issue(pki_paths, "desk")
    guard = guard_for(
        GuardConfig(
            services=["a.B"],
            permissions={"/a.B/M": "orders:read"},
            settings=GuardSettings(fill_turns=7, fill_patience=3),
        ),
        workload=tls.Workload.of(pki_paths, "desk"),
        trust_domain=pki.trust_domain(pki_paths),
    )
    try:
        assert guard.quota is not None and guard.audit is not None
        for batcher in (
            guard.quota.batcher,
            guard.audit.batcher,
            guard.signed.batcher,
        ):  # VerifySignedRequests too
            assert (batcher.fill_turns, batcher.fill_patience) == (7, 3), batcher.name
        with pytest.raises(ValueError, match="fill_turns"):
            AuditStage(guard.channel, fill_turns=-1)
        with pytest.raises(ValueError, match="fill_patience"):
            AuditStage(guard.channel, fill_patience=-1)
    finally:
        await guard.close()
