"""Caller authorisation by SPIFFE ID: deny by default, allow-lists per method."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tradeguard.echo import ECHO, RunningEcho, running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.mesh import pki
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.rpc.status import rich_status

TD = "tradeguard.test"
PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"  # a rule names any method, served or not


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


# the echo service as the vehicle: Echo for ops only, Expand for ops and monitor
RULES = {f"/{ECHO}/Echo": frozenset({"ops"}), f"/{ECHO}/Expand": frozenset({"ops", "monitor"})}


@pytest.fixture
async def echo(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningEcho]:
    async with running_echo(pki_paths, rules=RULES, tls12_self_probe=False) as running:
        yield running


async def test_valid_client_not_on_the_list_gets_permission_denied(echo: RunningEcho) -> None:
    async with echo.channel("monitor") as channel:  # monitor may call Expand, not Echo
        stub = echo.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(echo_pb2.EchoRequest(text="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rich_status(err.value).reason == "CALLER_NOT_ALLOWED"
        expanded = [r async for r in stub.Expand(echo_pb2.ExpandRequest(text="y", count=2), timeout=5)]
        assert [r.index for r in expanded] == [0, 1]


async def test_allowed_client_is_served(echo: RunningEcho) -> None:
    async with echo.channel("ops") as channel:
        reply = await echo.stub(channel).Echo(echo_pb2.EchoRequest(text="hi"), timeout=5)
        assert reply.text == "hi"


async def test_workload_of_another_trust_domain_or_unlisted_is_denied(echo: RunningEcho) -> None:
    async with echo.channel("auth") as channel:  # a workload of ours with no rule at all
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.stub(channel).Echo(echo_pb2.EchoRequest(text="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_interleaved_callers_are_each_judged_by_their_own_certificate(echo: RunningEcho) -> None:
    # the peer identity is read once per call and shared by the interceptors: it must never leak across calls
    async with echo.channel("ops") as ops_channel, echo.channel("monitor") as monitor_channel:
        ops, monitor = echo.stub(ops_channel), echo.stub(monitor_channel)

        async def as_ops(i: int) -> bool:
            await ops.Echo(echo_pb2.EchoRequest(text=f"ops-{i}"), timeout=5)
            return True

        async def as_monitor(i: int) -> bool:
            try:
                await monitor.Echo(echo_pb2.EchoRequest(text=f"mon-{i}"), timeout=5)
            except grpc.aio.AioRpcError as error:
                return error.code() != grpc.StatusCode.PERMISSION_DENIED
            return True

        results = await asyncio.gather(*(f(i) for i in range(40) for f in (as_ops, as_monitor)))
    assert results == [True, False] * 40
