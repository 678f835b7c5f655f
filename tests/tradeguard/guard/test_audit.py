"""The guard's audit stage against the REAL audit service (a process: tests/support.py starts it per session beside
the key vault, auth and rate-limit services; a test that stops one starts its own), read back as `ops` through Query:
an accepted call recorded once with its fields, refusals recorded with no secret, a failing handler's second event,
failing closed while the audit service is down (OUTCOME_UNKNOWN for an order stored meanwhile, never OK; no handler
run afterwards until it is back), recovery, concurrent calls sharing AppendBatch calls, streaming methods."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.trading.service import SERVICE as TRADING
from services.trading.settings import Settings as TradingSettings
from tests.conftest import RunningTrading
from tests.support import (
    TIGHT_ORDERS_PER_HOUR,
    TIGHT_TIER,
    AuthServices,
    create_api_key,
    create_auth_user,
    stop_process,
    wait_healthy,
)
from tests.tradeguard.guard.conftest import ECHO_METHOD, EXPAND, Guarded, guarded_echo
from tradeguard.audit.recorder import MAX_TEXT
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.guard import AuditStage, Guard, GuardConfig, GuardSettings, guard_for
from tradeguard.guard.audit import AUDIT_UNAVAILABLE, OUTCOME_UNKNOWN
from tradeguard.guard.client import ApiKeyCredentials, signing_interceptors
from tradeguard.guard.layer import _order_details
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import ServerConfig
from tradeguard.settings import Env, SettingsError
from tradeguard.testing import RichStatus, eventually, rich_status, running_service
from tradeguard.trading.v1 import trading_pb2

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"


def _order(coid: str, quantity: str = "1") -> trading_pb2.PlaceOrderRequest:
    return trading_pb2.PlaceOrderRequest(
        account_id="acct-1",
        client_order_id=coid,
        symbol="BTC-USD",
        side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT,
        quantity=quantity,
        price="100",
    )


def _request_id() -> str:
    return f"req-audit-{secrets.token_hex(6)}"


def _now_us() -> int:
    return time.time_ns() // 1000


def _spiffe(paths: pki.PkiPaths, workload: str) -> str:
    return f"spiffe://{pki.trust_domain(paths)}/svc/{workload}"


async def refused(call: Awaitable[Any]) -> RichStatus:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return rich_status(failed.value)


async def recorded(auth: AuthServices, target: str | None = None, **query: Any) -> list[pb.StoredEntry]:
    """The guards' entries matching `query`, read from the audit service (the session's, or the one at `target`)
    as ops — not the auth service's and the key vault's own security events (the key's creation is recorded
    under the same key id: tests/tradeguard/audit/test_recording.py)."""
    async with auth.audit_channel("ops", target) as channel:
        reply = await audit_pb2_grpc.AuditServiceStub(channel).Query(
            pb.QueryRequest(page_size=1000, **query), timeout=10
        )
    return [e for e in reply.entries if not e.entry.recorder.endswith(("/svc/auth", "/svc/keyvault"))]


async def placed(trading: RunningTrading, key: ApiKeyCredentials, request_id: str, order: Any) -> Any:
    trading.key = key
    async with trading.channel() as channel:
        return await trading.stub(channel).PlaceOrder(
            order, metadata=(("x-request-id", request_id),), timeout=10
        )


def _stage(trading: RunningTrading) -> AuditStage:
    guard = trading.service.running.assembly.layers[0]
    assert isinstance(guard, Guard) and guard.audit is not None
    return guard.audit


# --- what is recorded ------------------------------------------------------------------------------------------


async def test_an_accepted_order_is_recorded_once_with_its_fields(trading: RunningTrading) -> None:
    user = await create_auth_user(trading.auth, "acct-1")
    key = await create_api_key(trading.auth, user.user_id)
    request_id = _request_id()
    before = _now_us()
    reply = await placed(trading, key, request_id, _order("audited-1"))
    after = _now_us()
    entries = await recorded(trading.auth, api_key_id=key.key_id)
    assert len(entries) == 1  # exactly one event: the response was released only once it was durable
    entry = entries[0].entry
    event = entry.event
    assert entry.recorder == _spiffe(trading.paths, "trading")
    assert event.outcome == pb.OUTCOME_OK and event.status_code == "OK"
    assert (event.principal, event.account_id, event.api_key_id) == (user.user_id, "acct-1", key.key_id)
    assert event.caller == _spiffe(trading.paths, "ops") and event.source_ip == "127.0.0.1"
    assert (event.method, event.resource, event.action) == (PLACE, "audited-1", "orders:write")
    assert event.quota_decision == "allowed" and event.request_id == request_id
    # the order as requested, by name (the monitor's volume and notional baselines), nothing else of the request
    assert dict(event.details) == {"symbol": "BTC-USD", "side": "SIDE_BUY", "quantity": "1", "price": "100"}
    assert before <= event.time.ToMicroseconds() <= after
    assert 0 <= event.latency.ToMicroseconds() <= after - before
    # the kernel's verdict (adjtimex), as RTS 25 asks: this machine answers it, synchronised or not
    assert event.clock.sync in (pb.CLOCK_SYNC_SYNCHRONIZED, pb.CLOCK_SYNC_UNSYNCHRONIZED)
    assert re.fullmatch(r"g[0-9a-f]{16}-[0-9a-f]+", event.event_id)
    assert reply.order.client_order_id == "audited-1"


async def test_refusals_are_recorded_before_they_are_returned_with_no_secret(trading: RunningTrading) -> None:
    user = await create_auth_user(trading.auth, "acct-1")
    key = await create_api_key(trading.auth, user.user_id)
    assert key.secret is not None
    wrong = key.secret[:-4] + ("AAAA" if not key.secret.endswith("AAAA") else "BBBB")
    forged = ApiKeyCredentials(key.key_id, secret=wrong)
    start = _now_us()
    unauthenticated = _request_id()
    trading.key = forged
    async with trading.channel() as channel:
        status = await refused(
            trading.stub(channel).PlaceOrder(
                _order("forged-1"), metadata=(("x-request-id", unauthenticated),), timeout=10
            )
        )
    assert status.code == grpc.StatusCode.UNAUTHENTICATED
    since = Timestamp(seconds=start // 1_000_000)
    denied = [
        e
        for e in await recorded(
            trading.auth, method=PLACE, outcome=pb.OUTCOME_DENIED_AUTHENTICATION, start_time=since
        )
        if e.entry.event.request_id == unauthenticated
    ]
    assert len(denied) == 1
    event = denied[0].entry.event
    assert event.status_code == "UNAUTHENTICATED" and event.principal == "" and event.details["cause"]
    assert event.api_key_id == key.key_id  # the key id the call claimed (its signature was not the key's)
    assert event.account_id == "acct-1"  # as the request named it: nobody was authenticated
    stored = denied[0].entry_bytes
    assert key.secret.encode() not in stored and wrong.encode() not in stored
    assert re.search(rb"[0-9a-f]{64}", stored) is None  # no signature (64 hex digits) either

    reader = await create_api_key(trading.auth, user.user_id, "orders:read")
    status = await refused(placed(trading, reader, _request_id(), _order("no-permission")))
    assert status.code == grpc.StatusCode.PERMISSION_DENIED
    (entry,) = await recorded(trading.auth, api_key_id=reader.key_id)
    event = entry.entry.event
    assert event.outcome == pb.OUTCOME_DENIED_PERMISSION and event.status_code == "PERMISSION_DENIED"
    assert event.quota_decision == ""  # refused (by the auth service, for a key) before the quota stage

    tight = await create_api_key(trading.auth, user.user_id, tier=TIGHT_TIER)
    for index in range(TIGHT_ORDERS_PER_HOUR):
        await placed(trading, tight, _request_id(), _order(f"tight-{index}"))
    status = await refused(placed(trading, tight, _request_id(), _order("tight-over")))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    entries = await recorded(trading.auth, api_key_id=tight.key_id)
    outcomes = [e.entry.event.outcome for e in entries]
    assert outcomes == [pb.OUTCOME_OK] * TIGHT_ORDERS_PER_HOUR + [pb.OUTCOME_DENIED_QUOTA]
    over = entries[-1].entry.event
    assert over.status_code == "RESOURCE_EXHAUSTED" and over.resource == "tight-over"
    assert over.quota_decision.startswith(f"refused: orders/per-hour: {TIGHT_ORDERS_PER_HOUR} per 1h")


async def test_a_failing_handler_is_recorded_by_a_second_event_of_the_same_call(
    trading: RunningTrading,
) -> None:
    user = await create_auth_user(trading.auth, "acct-1")
    key = await create_api_key(trading.auth, user.user_id)
    request_id = _request_id()
    status = await refused(placed(trading, key, request_id, _order("bad-quantity", quantity="-1")))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    accepted, failure = (e.entry.event for e in await recorded(trading.auth, api_key_id=key.key_id))
    assert accepted.outcome == pb.OUTCOME_OK and accepted.request_id == request_id
    assert failure.event_id == accepted.event_id + ".f" and failure.request_id == request_id
    assert failure.outcome == pb.OUTCOME_INVALID and failure.status_code == "INVALID_ARGUMENT"
    assert failure.principal == user.user_id and failure.resource == "bad-quantity"
    assert failure.latency.ToMicroseconds() >= accepted.latency.ToMicroseconds()


# --- failing closed ----------------------------------------------------------------------------------------------


class OwnAudit:
    """An audit process of a test's own (a name, log and port of its own, on the session's key vault), which the
    test may stop and start again on the same port and log."""

    def __init__(self, auth: AuthServices) -> None:
        self.auth = auth
        self.name = f"audit-{secrets.token_hex(4)}"
        self.process, self.target = auth.start_audit(self.name)

    async def ready(self) -> None:
        ops = tls.Workload.of(self.auth.paths, "ops")
        await wait_healthy(self.process, self.target, "audit", ops, self.auth.paths.home / f"{self.name}.log")

    def stop(self) -> None:
        stop_process(self.process)

    async def restart(self) -> None:
        self.process, _ = self.auth.start_audit(self.name, port=int(self.target.rpartition(":")[2]))
        await self.ready()


@pytest.fixture
async def own_audit(auth_services: AuthServices) -> AsyncIterator[OwnAudit]:
    audit = OwnAudit(auth_services)
    try:
        await audit.ready()
        yield audit
    finally:
        audit.stop()


@pytest.mark.parametrize("write_ahead", [True, False], ids=["write-ahead", "beside-the-handler"])
async def test_audit_down_fails_closed_and_recovers(
    pki_paths: pki.PkiPaths, auth_services: AuthServices, own_audit: OwnAudit, write_ahead: bool
) -> None:
    """PlaceOrder takes effect: by default (write-ahead) its handler runs only once its event is acknowledged, so
    with the audit service down no order is stored at all; with AUDIT_WRITE_AHEAD off its append runs beside the
    handler, and the order stored meanwhile is answered OUTCOME_UNKNOWN, never OK."""
    target = own_audit.target
    home = pki_paths.home
    settings = TradingSettings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
        guard=GuardSettings(
            auth_target=auth_services.auth_target,
            ratelimit_target=auth_services.ratelimit_target,
            audit_target=target,
            audit_write_ahead=write_ahead,
        ),
    )
    user = await create_auth_user(auth_services, "acct-1")
    key = await create_api_key(auth_services, user.user_id)
    async with running_service(TRADING, settings, pki_paths) as service:
        trading = RunningTrading(service, pki_paths, auth_services, key)
        guard = service.running.assembly.layers[0]
        assert isinstance(guard, Guard)
        await eventually(lambda: guard.revocations.is_up)
        stage = _stage(trading)
        await placed(trading, key, _request_id(), _order("before"))
        assert not stage.degraded

        own_audit.stop()  # the session's audit service stays up: this test stops its own

        status = await refused(placed(trading, key, _request_id(), _order("meanwhile")))
        assert status.code == grpc.StatusCode.UNAVAILABLE and stage.degraded
        if write_ahead:  # the append went first and failed: the handler never ran
            assert status.reason == AUDIT_UNAVAILABLE
            assert stage.unknown_outcomes == 0 and stage.refused_degraded == 1
        else:  # the handler ran beside the failed append: the order is stored, its outcome unknown to the caller
            assert status.reason == OUTCOME_UNKNOWN
            assert stage.unknown_outcomes == 1 and stage.refused_degraded == 0
        # degraded: the append goes first for every method, and the handler never runs without it
        status = await refused(placed(trading, key, _request_id(), _order("never")))
        assert status.code == grpc.StatusCode.UNAVAILABLE and status.reason == AUDIT_UNAVAILABLE
        assert stage.refused_degraded == (2 if write_ahead else 1)
        # a refusal stays a refusal while the audit service is down
        reader = await create_api_key(auth_services, user.user_id, "orders:read")
        status = await refused(placed(trading, reader, _request_id(), _order("not-allowed")))
        assert status.code == grpc.StatusCode.PERMISSION_DENIED

        await own_audit.restart()
        attempt = 0

        async def order_after_recovery() -> bool:
            nonlocal attempt
            attempt += 1
            try:
                await placed(trading, key, _request_id(), _order(f"after-{attempt}"))
            except grpc.aio.AioRpcError as error:
                assert rich_status(error).reason == AUDIT_UNAVAILABLE  # nothing run unaudited meanwhile
                return False
            return True

        await _eventually_async(order_after_recovery)
        assert not stage.degraded

        trading.key = key
        async with trading.channel() as channel:
            listed = await trading.stub(channel).ListOrders(
                trading_pb2.ListOrdersRequest(account_id="acct-1", page_size=100), timeout=10
            )
        stored = {o.client_order_id for o in listed.orders}
        assert {"before", f"after-{attempt}"} <= stored and "never" not in stored
        assert ("meanwhile" in stored) is not write_ahead
        oks = [
            e.entry.event.resource
            for e in await recorded(
                auth_services, target, api_key_id=key.key_id, method=PLACE, outcome=pb.OUTCOME_OK
            )
        ]
        assert oks == ["before", f"after-{attempt}"]  # never an OK event for the order of unknown outcome


async def _eventually_async(attempt: Callable[[], Awaitable[bool]], within_s: float = 30.0) -> None:
    """Until `attempt()` answers True (the channel's reconnection backoff decides when the first does)."""
    async with asyncio.timeout(within_s):
        while not await attempt():  # noqa: ASYNC110 - each attempt is a call; nothing to wait on between them
            await asyncio.sleep(0.05)


# --- batching and streams ------------------------------------------------------------------------------------------


async def test_concurrent_calls_share_append_batch_calls(trading: RunningTrading) -> None:
    user = await create_auth_user(trading.auth, "acct-1")
    key = await create_api_key(trading.auth, user.user_id)
    stage = _stage(trading)
    batches, items, rpcs = stage.batcher.batches, stage.batcher.items, stage.rpcs
    trading.key = key
    calls = 64
    async with trading.channel() as channel:
        orders = trading.stub(channel)
        await asyncio.gather(*(orders.PlaceOrder(_order(f"batch-{i}"), timeout=30) for i in range(calls)))
    assert stage.batcher.items - items == calls and stage.rpcs - rpcs == stage.batcher.batches - batches
    assert stage.batcher.batches - batches < calls and stage.batcher.largest_batch > 1
    assert len(await recorded(trading.auth, api_key_id=key.key_id)) == calls


async def test_streaming_methods_are_recorded(guarded: Guarded) -> None:
    _, key = await guarded.key()
    async with guarded.channel(signing_interceptors(key)) as channel:
        echo = echo_pb2_grpc.EchoServiceStub(channel)
        items = [r async for r in echo.Expand(echo_pb2.ExpandRequest(text="x", count=3), timeout=10)]
        collected = await echo.Collect(
            _texts(["a", "b"]),
            timeout=10,
        )
    assert len(items) == 3 and collected.count == 2
    entries = await recorded(guarded.auth, api_key_id=key.key_id)
    assert [(e.entry.event.method, e.entry.event.outcome) for e in entries] == [
        (EXPAND, pb.OUTCOME_OK),
        (EXPAND.replace("Expand", "Collect"), pb.OUTCOME_OK),
    ]
    assert all(e.entry.recorder == _spiffe(guarded.paths, "echo") for e in entries)


async def _texts(texts: list[str]) -> AsyncIterator[echo_pb2.CollectRequest]:
    for text in texts:
        yield echo_pb2.CollectRequest(text=text)


async def test_a_stream_is_held_until_its_event_is_acknowledged(
    pki_paths: pki.PkiPaths, auth_services: AuthServices, own_audit: OwnAudit
) -> None:
    """A server stream's first message waits for the append: with the audit service down, the caller gets
    UNAVAILABLE (the handler ran: OUTCOME_UNKNOWN) and not one message."""
    async with guarded_echo(pki_paths, auth_services, audit_target=own_audit.target) as guarded:
        _, key = await guarded.key()
        async with guarded.channel(signing_interceptors(key)) as channel:
            echo = echo_pb2_grpc.EchoServiceStub(channel)
            assert (
                len([r async for r in echo.Expand(echo_pb2.ExpandRequest(text="x", count=2), timeout=10)])
                == 2
            )
            own_audit.stop()
            received: list[echo_pb2.ExpandResponse] = []
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for item in echo.Expand(echo_pb2.ExpandRequest(text="x", count=2), timeout=10):
                    received.append(item)
    status = rich_status(failed.value)
    assert status.code == grpc.StatusCode.UNAVAILABLE and status.reason == OUTCOME_UNKNOWN
    assert received == []


async def test_a_call_of_an_undeclared_method_is_recorded_as_refused(
    pki_paths: pki.PkiPaths, auth_services: AuthServices
) -> None:
    async with guarded_echo(pki_paths, auth_services, permissions={ECHO_METHOD: "orders:read"}) as guarded:
        _, key = await guarded.key()
        request_id = _request_id()
        start = Timestamp(seconds=_now_us() // 1_000_000)
        async with guarded.channel(signing_interceptors(key)) as channel:
            expand = echo_pb2_grpc.EchoServiceStub(channel).Expand(
                echo_pb2.ExpandRequest(text="x", count=1),
                metadata=(("x-request-id", request_id),),
                timeout=10,
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                [r async for r in expand]
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    entries = await recorded(
        auth_services, method=EXPAND, outcome=pb.OUTCOME_DENIED_PERMISSION, start_time=start
    )
    (event,) = [e.entry.event for e in entries if e.entry.event.request_id == request_id]
    assert event.status_code == "PERMISSION_DENIED" and event.principal == "" and event.action == ""


# --- configuration ---------------------------------------------------------------------------------------------


def test_the_audit_settings() -> None:
    assert GuardSettings().audit and GuardSettings().audit_target == "127.0.0.1:50053"
    read = GuardSettings.read(Env("TG_X", {"TG_X_AUDIT": "false", "TG_X_AUDIT_TARGET": "10.0.0.5:7000"}))
    assert not read.audit and read.audit_target == "10.0.0.5:7000"
    assert GuardSettings.read(Env("TG_X", {})).audit
    with pytest.raises(SettingsError, match="TG_X_AUDIT"):
        GuardSettings.read(Env("TG_X", {"TG_X_AUDIT": "maybe"}))
    assert GuardSettings().audit_write_ahead and GuardSettings.read(Env("TG_X", {})).audit_write_ahead
    assert not GuardSettings.read(Env("TG_X", {"TG_X_AUDIT_WRITE_AHEAD": "false"})).audit_write_ahead
    with pytest.raises(SettingsError, match="TG_X_AUDIT_WRITE_AHEAD"):
        GuardSettings.read(Env("TG_X", {"TG_X_AUDIT_WRITE_AHEAD": "sometimes"}))


def test_the_trading_service_declares_what_takes_effect() -> None:
    """Every trading method that is not a read (Get…, List…) changes state, and is write-ahead."""
    assert TRADING.permissions is not None
    reads = {m for m in TRADING.permissions if m.rsplit("/", 1)[1].startswith(("Get", "List"))}
    assert TRADING.effect_methods == set(TRADING.permissions) - reads
    assert (
        f"{PLACE.rsplit('/', 1)[0]}/CancelOrder" in TRADING.effect_methods and PLACE in TRADING.effect_methods
    )


async def test_audit_off_builds_no_stage_and_no_after_hook(pki_paths: pki.PkiPaths) -> None:
    pki.issue(pki_paths, "desk")
    config = GuardConfig(
        services=["a.B"], permissions={"/a.B/M": "orders:read"}, settings=GuardSettings(audit=False)
    )
    guard = guard_for(
        config, workload=tls.Workload.of(pki_paths, "desk"), trust_domain=pki.trust_domain(pki_paths)
    )
    try:
        assert guard.audit is None and guard.audit_channel is None and guard.layer.audit is None
        assert guard.layer.after_for_method("/a.B/M") is None  # the chain builds the method as before
    finally:
        await guard.close()
    on = guard_for(
        replace(config, settings=GuardSettings()),
        workload=tls.Workload.of(pki_paths, "desk"),
        trust_domain=pki.trust_domain(pki_paths),
    )
    try:
        assert on.audit is not None and on.layer.after_for_method("/a.B/M") is not None
        assert on.layer.after_for_method("/a.B/Other") is None  # undeclared: refused in its check, no hook
    finally:
        await on.close()


# --- an order's fields in the details (pure) ---------------------------------------------------------------------


def test_an_order_s_fields_by_name_and_nothing_else_of_the_request() -> None:
    market = trading_pb2.PlaceOrderRequest(
        account_id="acct-1",
        client_order_id="c-1",
        symbol="ETH-USD",
        side=trading_pb2.SIDE_SELL,
        type=trading_pb2.ORDER_TYPE_MARKET,
        quantity="0.25",
    )
    assert _order_details(market) == {
        "symbol": "ETH-USD",
        "side": "SIDE_SELL",
        "quantity": "0.25",
    }  # no price
    assert _order_details(_order("c-2", "3")) == {
        "symbol": "BTC-USD",
        "side": "SIDE_BUY",
        "quantity": "3",
        "price": "100",
    }
    # not an order: a cancellation, an echo, something that is not a message at all
    assert _order_details(trading_pb2.CancelOrderRequest(account_id="acct-1", order_id="o-1")) is None
    assert _order_details(echo_pb2.EchoRequest(text="hi")) is None
    assert _order_details(object()) is None


async def test_an_order_s_fields_are_cut_like_the_other_texts() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:9")
    try:
        stage = AuditStage(channel, clock_us=lambda: 0)
        long = _order("c-3", "1" * 1000)
        event = stage.event(
            time_us=0,
            method=PLACE,
            outcome=pb.OUTCOME_OK,
            status="OK",
            latency_us=0,
            details=_order_details(long),
        )
        assert event.details["quantity"] == "1" * MAX_TEXT and event.details["side"] == "SIDE_BUY"
    finally:
        await channel.close(None)


def test_a_write_ahead_method_must_be_a_guarded_one() -> None:
    with pytest.raises(ValueError, match="write-ahead methods that are not guarded"):
        Guard(
            trust_domain="t",
            services=["a.B"],
            permissions={"/a.B/M": "orders:write"},
            write_ahead=["/a.B/N"],
            jwt=None,  # type: ignore[arg-type]
            signed=None,  # type: ignore[arg-type]
            revocations=None,  # type: ignore[arg-type]
        )
