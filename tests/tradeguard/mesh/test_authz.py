"""Caller authorisation by SPIFFE ID: deny by default, allow-lists per method."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tradeguard.mesh.authz import MethodPolicy
from tradeguard.rpc.status import rich_status
from tradeguard.trading.v1 import trading_pb2

TD = "tradeguard.test"
PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"


def test_policy_exact_wildcard_and_default_deny() -> None:
    policy = MethodPolicy(TD, {PLACE: {"ops"}, "/pkg.Admin/*": {"ops", "auth"}})
    assert policy.allows(PLACE, f"spiffe://{TD}/svc/ops")
    assert not policy.allows(PLACE, f"spiffe://{TD}/svc/auth")
    assert policy.allows("/pkg.Admin/Anything", f"spiffe://{TD}/svc/auth")
    assert not policy.allows("/pkg.Other/Method", f"spiffe://{TD}/svc/ops")  # no rule: denied
    assert not policy.allows(PLACE, None)
    assert not policy.allows(PLACE, "spiffe://evil.example/svc/ops")  # another trust domain
    assert not policy.allows(PLACE, f"spiffe://{TD}/svc/ops/extra")
    assert not policy.allows(PLACE, f"spiffe://{TD}/user/ops")
    assert not policy.allows(PLACE, "ops")


def test_kit_rules_health_any_workload_reflection_ops_only() -> None:
    policy = MethodPolicy(TD, {})
    assert policy.allows("/grpc.health.v1.Health/Check", f"spiffe://{TD}/svc/monitor")
    assert policy.allows(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", f"spiffe://{TD}/svc/ops"
    )
    assert not policy.allows(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", f"spiffe://{TD}/svc/monitor"
    )


def test_malformed_rule_rejected() -> None:
    with pytest.raises(ValueError, match=r"not /package\.Service"):
        MethodPolicy(TD, {"PlaceOrder": {"ops"}})


def _order(coid: str) -> trading_pb2.PlaceOrderRequest:
    return trading_pb2.PlaceOrderRequest(
        account_id="acct-1",
        client_order_id=coid,
        symbol="BTC-USD",
        side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT,
        quantity="0.5",
        price="100.25",
    )


async def test_valid_client_not_on_the_list_gets_permission_denied(trading) -> None:
    async with trading.channel("monitor") as channel:  # monitor may read orders, not place them
        stub = trading.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PlaceOrder(_order("c-1"), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rich_status(err.value).reason == "CALLER_NOT_ALLOWED"
        listed = await stub.ListOrders(trading_pb2.ListOrdersRequest(account_id="acct-1"), timeout=5)
        assert list(listed.orders) == []


async def test_allowed_client_places_order(trading) -> None:
    async with trading.channel("ops") as channel:
        reply = await trading.stub(channel).PlaceOrder(_order("c-2"), timeout=5)
        assert reply.order.status == trading_pb2.ORDER_STATUS_OPEN


async def test_interleaved_callers_are_each_judged_by_their_own_certificate(trading) -> None:
    # the peer identity is read once per call and shared by the interceptors: it must never leak across calls
    async with trading.channel("ops") as ops_channel, trading.channel("monitor") as monitor_channel:
        ops, monitor = trading.stub(ops_channel), trading.stub(monitor_channel)

        async def as_ops(i: int) -> bool:
            await ops.PlaceOrder(_order(f"mix-{i}"), timeout=5)
            return True

        async def as_monitor(i: int) -> bool:
            try:
                await monitor.PlaceOrder(_order(f"mon-{i}"), timeout=5)
            except grpc.aio.AioRpcError as error:
                return error.code() != grpc.StatusCode.PERMISSION_DENIED
            return True

        results = await asyncio.gather(*(f(i) for i in range(40) for f in (as_ops, as_monitor)))
    assert results == [True, False] * 40
