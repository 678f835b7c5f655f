"""The trading service as assembled (services/trading/service.py) with its pre-trade controls, behind its real
guard, verified by the session's real auth service and recorded by its real audit service: risk rejections over
gRPC (code, reason, metadata, audited as DENIED_RISK), the idempotent retry, the kill switch on TWO instances on
one database (SQLite and PostgreSQL) within a second, release with a fresh second factor only, switches
surviving a restart, and the admin RPCs."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.trading.controls import TradingControls
from services.trading.core import TradingCore
from services.trading.service import SERVICE
from services.trading.settings import RiskSettings, Settings
from services.trading.store_postgres import PostgresOrderStore
from services.trading.store_sqlite import SqliteOrderStore
from tests.support import (
    PG_DSN,
    AuthServices,
    create_api_key,
    create_auth_user,
    log_in,
    log_in_tokens,
)
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.auth.v1 import auth_pb2 as auth_pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard import GuardSettings
from tradeguard.guard.client import (
    ApiKeyCredentials,
    authenticated_channel,
    bearer_interceptors,
    signing_interceptors,
)
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import ServerConfig
from tradeguard.rpc.status import RichStatus, rich_status
from tradeguard.service import Running, Stores, start
from tradeguard.testing import eventually
from tradeguard.trading.v1 import trading_pb2 as tp
from tradeguard.trading.v1 import trading_pb2_grpc

from .conftest import Backend


def controls(running: Running[Any, Any]) -> TradingControls:
    core = running.core
    assert isinstance(core, TradingCore) and core.controls is not None
    return core.controls


PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
RISK = """version: 1
defaults:
  max_quantity: 100
  max_notional: 1000000
  price_collar_bps: 1000
  credit_limit: 200000
  duplicate_window: 1s
  throttle: {messages: 1000, window: 1s}
restricted_symbols: [GME]
reference_prices: {BTC-USD: 64000, ETH-USD: 3200}
"""


def order(coid: str, **over: Any) -> tp.PlaceOrderRequest:
    fields: dict[str, Any] = dict(
        client_order_id=coid,
        symbol="BTC-USD",
        side=tp.SIDE_BUY,
        type=tp.ORDER_TYPE_LIMIT,
        quantity="0.5",
        price="64000.25",
    )
    fields.update(over)
    return tp.PlaceOrderRequest(**fields)


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, RichStatus]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code(), rich_status(failed.value)


def metadata(status: RichStatus) -> dict[str, str]:
    assert status.error_info is not None
    return dict(status.error_info.metadata)


class Instances:
    """Trading instances on one database, with the session's auth, rate-limit and audit services."""

    def __init__(self, paths: pki.PkiPaths, auth: AuthServices, backend: Backend, risk_file: Path) -> None:
        self.paths = paths
        self.auth = auth
        self.backend = backend
        self.risk_file = risk_file
        self.running: list[Running[Any, Any]] = []
        self._stack = AsyncExitStack()

    async def start(self, poll_interval_s: float = 0.2) -> Running[Any, Any]:
        backend = self.backend

        async def sqlite(path: Path) -> SqliteOrderStore:
            return await SqliteOrderStore.open(backend.path)

        async def postgres(url: str) -> PostgresOrderStore:
            return await PostgresOrderStore.open(PG_DSN, schema=backend.schema, min_size=1, max_size=4)

        declaration = dataclasses.replace(SERVICE, stores=Stores(sqlite=sqlite, postgres=postgres))
        home = self.paths.home
        settings = Settings(
            server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0),
            database_url=f"sqlite:///{backend.path}" if backend.kind == "sqlite" else PG_DSN,
            guard=GuardSettings(
                auth_target=self.auth.auth_target,
                ratelimit_target=self.auth.ratelimit_target,
                audit_target=self.auth.audit_target,
            ),
            risk=RiskSettings(enabled=True, file=self.risk_file, poll_interval_s=poll_interval_s),
        )
        running = await start(declaration, settings)
        self.running.append(running)
        return running

    async def stop(self, running: Running[Any, Any]) -> None:
        self.running.remove(running)
        await running.stop(grace=0, drain=0)

    async def close(self) -> None:
        for running in list(self.running):
            await self.stop(running)

    def channel(self, running: Running[Any, Any], auth: list[grpc.aio.ClientInterceptor]) -> grpc.aio.Channel:
        return authenticated_channel(
            f"127.0.0.1:{running.port}", "trading", tls.Workload.of(self.paths, "ops"), auth
        )

    def stub(self, channel: grpc.aio.Channel) -> trading_pb2_grpc.TradingServiceAsyncStub:
        return trading_pb2_grpc.TradingServiceStub(channel)


@pytest.fixture
async def instances(
    pki_paths: pki.PkiPaths, auth_services: AuthServices, backend: Backend, tmp_path: Path
) -> AsyncIterator[Instances]:
    risk_file = tmp_path / "risk.yaml"
    risk_file.write_text(RISK)
    group = Instances(pki_paths, auth_services, backend, risk_file)
    try:
        yield group
    finally:
        await group.close()


async def trader(auth: AuthServices, account: str) -> list[grpc.aio.ClientInterceptor]:
    user = await create_auth_user(auth, account)
    key: ApiKeyCredentials = await create_api_key(auth, user.user_id)
    return signing_interceptors(key)


async def officer(auth: AuthServices, fresh: bool = True) -> list[grpc.aio.ClientInterceptor]:
    """A risk officer's token: from a login with a second factor (`fresh`), or with a password only."""
    roles = ("risk-officer", "trader") if fresh else ("risk-officer",)
    user = await create_auth_user(auth, "acct-ops", roles=roles)
    return bearer_interceptors(await log_in(auth, user))


@asynccontextmanager
async def stub_of(
    group: Instances, running: Running[Any, Any], auth: list[grpc.aio.ClientInterceptor]
) -> AsyncIterator[trading_pb2_grpc.TradingServiceAsyncStub]:
    async with group.channel(running, auth) as channel:
        yield group.stub(channel)


def unique_account(prefix: str) -> str:
    """An account id no other test uses — letters and digits mixed: a long run of digits (a nanosecond clock, say)
    can pass for a card number, which the audit service masks, and the test could no longer find its events."""
    return f"acct-{prefix}-{secrets.token_hex(6)}"


async def audited(auth: AuthServices, **query: Any) -> list[pb.StoredEntry]:
    async with auth.audit_channel("ops") as channel:
        reply = await audit_pb2_grpc.AuditServiceStub(channel).Query(
            pb.QueryRequest(page_size=1000, **query), timeout=10
        )
    return [e for e in reply.entries if e.entry.recorder.endswith("/svc/trading")]


# --- the risk checks over the wire ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_each_risk_check_is_failed_precondition_with_its_values_and_audited(
    instances: Instances,
) -> None:
    running = await instances.start()
    account = unique_account("risk")
    auth = await trader(instances.auth, account)
    cases = [
        (order("qty", quantity="101"), "RISK_MAX_QUANTITY", {"limit": "100", "actual": "101"}),
        (
            order("collar", price="70400.01"),
            "RISK_PRICE_COLLAR",
            {"limit": "70400", "reference_price": "64000"},
        ),
        (order("gme", symbol="GME", price="10"), "RISK_RESTRICTED_SYMBOL", {"actual": "GME"}),
        (order("noref", symbol="SOL-USD", price="10"), "RISK_NO_REFERENCE_PRICE", {}),
        (order("notional", quantity="20", price="64000"), "RISK_MAX_NOTIONAL", {"limit": "1000000"}),
        (order("credit", quantity="4", price="64000"), "RISK_CREDIT_LIMIT", {"limit": "200000"}),
    ]
    async with stub_of(instances, running, auth) as stub:
        for request, reason, expected in cases:
            code, status = await refused(stub.PlaceOrder(request, timeout=10))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and status.reason == reason
            assert expected.items() <= metadata(status).items()
            assert metadata(status)["account_id"] == account
        placed = await stub.PlaceOrder(order("ok"), timeout=10)
        code, status = await refused(stub.PlaceOrder(order("dup"), timeout=10))  # the same order, another id
        assert status.reason == "RISK_DUPLICATE_ORDER"
        assert metadata(status)["original_client_order_id"] == "ok"
        again = await stub.PlaceOrder(order("ok"), timeout=10)  # the retry: the same order, never a duplicate
        assert again.replayed and again.order.order_id == placed.order.order_id
    denied = await audited(instances.auth, account_id=account, outcome=pb.OUTCOME_DENIED_RISK)
    decisions = sorted(e.entry.event.risk_decision.split()[0] for e in denied)
    assert decisions == sorted([reason for _, reason, _ in cases] + ["RISK_DUPLICATE_ORDER"])
    collar = next(e.entry.event for e in denied if e.entry.event.resource == "collar")
    assert "reference_price=64000" in collar.risk_decision and collar.method == PLACE
    assert len(denied) == 7  # the seven refusals, each once as DENIED_RISK


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_message_throttle_refuses_with_retry_info(instances: Instances) -> None:
    running = await instances.start()
    account = unique_account("thr")
    async with stub_of(instances, running, await officer(instances.auth)) as admin:
        await admin.SetRiskLimits(
            tp.SetRiskLimitsRequest(
                account_id=account, limits=tp.RiskLimits(throttle_messages=2, throttle_window_ms=60_000)
            ),
            timeout=10,
        )
    async with stub_of(instances, running, await trader(instances.auth, account)) as stub:
        await stub.PlaceOrder(order("t-1", price="64001"), timeout=10)
        await stub.PlaceOrder(order("t-2", price="64002"), timeout=10)
        code, status = await refused(stub.PlaceOrder(order("t-3", price="64003"), timeout=10))
        assert (code, status.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RISK_MESSAGE_THROTTLE")
        assert metadata(status)["limit"] == "2 per 60000000us"
        assert status.retry_delay_s is not None and 0 < status.retry_delay_s <= 60
        again = await stub.PlaceOrder(order("t-1", price="64001"), timeout=10)  # a retry is not a message
        assert again.replayed
    denied = await audited(instances.auth, account_id=account, outcome=pb.OUTCOME_DENIED_RISK)
    assert [e.entry.event.risk_decision.split()[0] for e in denied] == ["RISK_MESSAGE_THROTTLE"]


# --- the kill switch on two instances ---------------------------------------------------------------------


async def test_kill_switch_on_two_instances_within_a_second(instances: Instances) -> None:
    a, b = await instances.start(), await instances.start()
    account = unique_account("halt")
    auth = await trader(instances.auth, account)
    halt = await officer(instances.auth)
    async with stub_of(instances, a, auth) as on_a, stub_of(instances, b, auth) as on_b:
        opened = [
            (await stub.PlaceOrder(order(f"open-{i}", price=str(64000 + i)), timeout=10)).order.order_id
            for i, stub in enumerate((on_a, on_b, on_a, on_b))
        ]
        async with stub_of(instances, a, halt) as admin:
            engaged_at = time.monotonic()
            reply = await admin.EngageKillSwitch(
                tp.EngageKillSwitchRequest(
                    scope=tp.KILL_SWITCH_SCOPE_ACCOUNT, value=account, reason="runaway algo"
                ),
                timeout=10,
            )
            assert reply.cancelled_orders == 4 and reply.kill_switch.value == account
            # A refuses at once; B within a second: measured from the engage's start to B's first refusal
            code, status = await refused(on_a.PlaceOrder(order("after-a", price="64100"), timeout=10))
            assert (code, status.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KILL_SWITCH_ENGAGED")
            assert metadata(status) == {"scope": "ACCOUNT", "value": account}
            code, status = await refused(on_b.PlaceOrder(order("after-b", price="64200"), timeout=10))
            b_refused_after = time.monotonic() - engaged_at
            assert status.reason == "KILL_SWITCH_ENGAGED" and b_refused_after < 1.0, b_refused_after
            # and B's own (in-memory) view has it within the second too: the poll, not only the store's re-check
            await eventually(lambda: bool(controls(b).switches), within_s=5.0)
            b_knows_after = time.monotonic() - engaged_at
            assert b_knows_after < 1.0, b_knows_after
            listed = await admin.ListKillSwitches(tp.ListKillSwitchesRequest(), timeout=10)
            assert [s.value for s in listed.kill_switches] == [account]
        for order_id in opened:
            got = await on_b.GetOrder(tp.GetOrderRequest(order_id=order_id), timeout=10)
            assert got.order.status == tp.ORDER_STATUS_CANCELED
    engage = await audited(instances.auth, method="/tradeguard.trading.v1.TradingService/EngageKillSwitch")
    assert any(e.entry.event.outcome == pb.OUTCOME_OK for e in engage)
    halted = await audited(instances.auth, account_id=account, outcome=pb.OUTCOME_DENIED_RISK)
    assert len(halted) == 2 and all("KILL_SWITCH_ENGAGED" in e.entry.event.risk_decision for e in halted)


async def test_the_credit_limit_holds_with_two_instances_under_concurrent_orders(
    instances: Instances,
) -> None:
    """24 orders of about 32000 each, sent to two instances at once, against a credit limit of 200000: exactly six
    placed (a seventh would pass 200000), every other one refused RISK_CREDIT_LIMIT."""
    a, b = await instances.start(), await instances.start()
    account = unique_account("credit")
    auth = await trader(instances.auth, account)
    async with stub_of(instances, a, auth) as on_a, stub_of(instances, b, auth) as on_b:

        async def place(i: int) -> str:
            stub = on_a if i % 2 else on_b
            try:
                await stub.PlaceOrder(order(f"cr-{i}", price=f"64000.{i:02d}"), timeout=20)
            except grpc.aio.AioRpcError as error:
                return rich_status(error).reason or error.code().name
            return "OK"

        outcomes = await asyncio.gather(*(place(i) for i in range(24)))
        listed = await on_a.ListOrders(tp.ListOrdersRequest(page_size=100), timeout=10)
    assert sorted(set(outcomes)) == ["OK", "RISK_CREDIT_LIMIT"], outcomes
    assert outcomes.count("OK") == 6 == len(listed.orders)
    total = sum(Decimal(o.quantity) * Decimal(o.price) for o in listed.orders)
    assert total <= 200000


# --- release: a fresh second factor only ------------------------------------------------------------------


async def logged_in_with_refresh(auth: AuthServices) -> tuple[str, str]:
    """(access token, refresh token) of a new risk officer (and trader: a second factor required), logged in with
    a TOTP code."""
    user = await create_auth_user(auth, "acct-ops", roles=("risk-officer", "trader"))
    tokens = await log_in_tokens(auth, user)
    return tokens.access_token, tokens.refresh_token


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_release_needs_a_fresh_second_factor(instances: Instances) -> None:
    running = await instances.start()
    access, refresh = await logged_in_with_refresh(instances.auth)
    async with instances.auth.channel("ops") as channel:
        refreshed = await auth_pb2_grpc.AuthServiceStub(channel).RefreshToken(
            auth_pb.RefreshTokenRequest(refresh_token=refresh), timeout=10
        )
    engage = tp.EngageKillSwitchRequest(scope=tp.KILL_SWITCH_SCOPE_SYMBOL, value="ETH-USD", reason="halt")
    release = tp.ReleaseKillSwitchRequest(scope=tp.KILL_SWITCH_SCOPE_SYMBOL, value="ETH-USD", reason="clear")
    async with stub_of(instances, running, bearer_interceptors(refreshed.tokens.access_token)) as stale:
        await stale.EngageKillSwitch(engage, timeout=10)  # engaging needs only the permission
        code, status = await refused(stale.ReleaseKillSwitch(release, timeout=10))  # a refreshed token
        assert (code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FRESH_MFA_REQUIRED")
    async with stub_of(instances, running, await officer(instances.auth, fresh=False)) as password_only:
        code, status = await refused(password_only.ReleaseKillSwitch(release, timeout=10))
        assert (code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FRESH_MFA_REQUIRED")
    async with stub_of(instances, running, await trader(instances.auth, "acct-t")) as trader_stub:
        code, _ = await refused(trader_stub.EngageKillSwitch(engage, timeout=10))  # no trading:halt
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, status = await refused(
            trader_stub.PlaceOrder(order("eth", symbol="ETH-USD", price="3200"), timeout=10)
        )
        assert status.reason == "KILL_SWITCH_ENGAGED"
    async with stub_of(instances, running, bearer_interceptors(access)) as fresh:
        released = await fresh.ReleaseKillSwitch(release, timeout=10)
        assert released.kill_switch.release_reason == "clear" and released.kill_switch.HasField(
            "release_time"
        )
        code, status = await refused(fresh.ReleaseKillSwitch(release, timeout=10))
        assert (code, status.reason) == (grpc.StatusCode.NOT_FOUND, "KILL_SWITCH_NOT_ENGAGED")
        history = await fresh.ListKillSwitches(tp.ListKillSwitchesRequest(include_released=True), timeout=10)
        assert [s.reason for s in history.kill_switches] == ["halt"]
    released_events = await audited(
        instances.auth, method="/tradeguard.trading.v1.TradingService/ReleaseKillSwitch"
    )
    assert {e.entry.event.status_code for e in released_events} >= {"PERMISSION_DENIED", "OK"}


# --- restarts and the admin RPCs --------------------------------------------------------------------------


async def test_a_switch_survives_a_restart(instances: Instances) -> None:
    running = await instances.start()
    async with stub_of(instances, running, await officer(instances.auth)) as admin:
        await admin.EngageKillSwitch(
            tp.EngageKillSwitchRequest(scope=tp.KILL_SWITCH_SCOPE_GLOBAL, reason="end of day"), timeout=10
        )
    await instances.stop(running)
    restarted = await instances.start()
    assert controls(restarted).switches  # in force before the first call
    async with stub_of(instances, restarted, await trader(instances.auth, "acct-r")) as stub:
        code, status = await refused(stub.PlaceOrder(order("after-restart"), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert metadata(status) == {"scope": "GLOBAL", "value": ""}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_reference_prices_and_limits_over_the_api(instances: Instances) -> None:
    running = await instances.start()
    account = unique_account("lim")
    async with (
        stub_of(instances, running, await officer(instances.auth)) as admin,
        stub_of(instances, running, await trader(instances.auth, account)) as stub,
    ):
        set_price = await admin.SetReferencePrice(
            tp.SetReferencePriceRequest(symbol="SOL-USD", price="150.50"), timeout=10
        )
        assert (set_price.symbol, set_price.price) == ("SOL-USD", "150.5")
        await stub.PlaceOrder(order("sol", symbol="SOL-USD", price="150"), timeout=10)
        code, _ = await refused(
            admin.SetReferencePrice(tp.SetReferencePriceRequest(symbol="X", price="0"), timeout=10)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        got = await admin.GetRiskLimits(tp.GetRiskLimitsRequest(account_id=account), timeout=10)
        assert (got.source, got.limits.max_quantity, got.HasField("override")) == (
            "file:defaults",
            "100",
            False,
        )
        assert list(got.limits.restricted_symbols) == ["GME"]
        changed = await admin.SetRiskLimits(
            tp.SetRiskLimitsRequest(account_id=account, limits=tp.RiskLimits(max_quantity="2")), timeout=10
        )
        assert (changed.source, changed.limits.max_quantity, changed.limits.credit_limit) == (
            "file:defaults+override",
            "2",
            "200000",
        )
        code, status = await refused(stub.PlaceOrder(order("big", quantity="3"), timeout=10))
        assert metadata(status)["limit"] == "2"
        code, status = await refused(
            admin.SetRiskLimits(
                tp.SetRiskLimitsRequest(account_id=account, limits=tp.RiskLimits(price_collar_bps=0)),
                timeout=10,
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in status.field_violations] == ["limits.price_collar_bps"]
        cleared = await admin.SetRiskLimits(
            tp.SetRiskLimitsRequest(account_id=account, clear=True), timeout=10
        )
        assert (cleared.source, cleared.limits.max_quantity) == ("file:defaults", "100")
        await stub.PlaceOrder(order("big-2", quantity="3", price="64000"), timeout=10)
    async with stub_of(instances, running, await trader(instances.auth, account)) as stub:
        code, _ = await refused(stub.GetRiskLimits(tp.GetRiskLimitsRequest(account_id=account), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # risk:manage only
