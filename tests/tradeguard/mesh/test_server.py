"""The server bootstrap: graceful shutdown, metrics on loopback, and failing closed without TLS 1.3-only."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import free_port
from tradeguard.mesh import pki, tls
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import MeshServer, ServerConfig, Service
from tradeguard.testing import eventually

STARTED: list[bytes] = []  # requests the slow handler has begun


async def _slow(request: bytes, context: Any) -> bytes:
    STARTED.append(request)
    await asyncio.sleep(float(request.decode()))
    return b"done"


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        "t.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(_slow)}
    )
    server.add_generic_rpc_handlers([handler])


DRAIN_S = 1.0


@pytest.fixture
async def slow_server(pki_paths: pki.PkiPaths) -> AsyncIterator[MeshServer]:
    config = ServerConfig(
        name="trading", port=0, home=pki_paths.home, drain_s=DRAIN_S, grace_s=10.0, metrics_port=free_port()
    )
    server = MeshServer(
        config, MethodPolicy("tradeguard.test", {"/t.Slow/*": {"ops"}}), [Service("t.Slow", _register)]
    )
    await server.start()
    yield server
    await server.stop(grace=0, drain=0)


def _channel(server: MeshServer, paths: pki.PkiPaths) -> MeshChannel:
    return MeshChannel(f"127.0.0.1:{server.port}", "trading", tls.Workload.of(paths, "ops"))


async def test_shutdown_drains_then_finishes_in_flight_calls(
    slow_server: MeshServer, pki_paths: pki.PkiPaths
) -> None:
    async with _channel(slow_server, pki_paths) as channel:
        wait = channel.unary_unary("/t.Slow/Wait")
        health = health_pb2_grpc.HealthStub(channel)
        long = b"%.1f" % (DRAIN_S + 2.5)  # outlives the drain
        in_flight = asyncio.ensure_future(wait(long, timeout=20))
        await eventually(lambda: long in STARTED)
        stopping = asyncio.ensure_future(slow_server.stop())
        await eventually(lambda: slow_server.draining)
        # draining: health says NOT_SERVING, and calls are still served
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await wait(b"0", timeout=5) == b"done"
        await asyncio.sleep(
            DRAIN_S + 0.2
        )  # the drain, which began before these checks, is over: new calls refused
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wait(b"0", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await in_flight == b"done"  # the call in flight when the stop began completed
        await stopping


async def test_metrics_served_on_loopback_per_method(
    slow_server: MeshServer, pki_paths: pki.PkiPaths
) -> None:
    async with _channel(slow_server, pki_paths) as channel:
        assert await channel.unary_unary("/t.Slow/Wait")(b"0", timeout=5) == b"done"
    port = slow_server.config.metrics_port
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    )
    assert 'tradeguard_rpc_requests_total{code="OK",method="/t.Slow/Wait",service="trading"} 1.0' in text
    assert "tradeguard_rpc_duration_seconds_bucket" in text


async def test_a_handler_registered_only_as_generic_goes_through_the_chain(
    slow_server: MeshServer, pki_paths: pki.PkiPaths
) -> None:
    """t.Slow registers a generic handler only (no registered methods): the chain still authorises it."""
    pki.issue(pki_paths, "auth")
    other = MeshChannel(f"127.0.0.1:{slow_server.port}", "trading", tls.Workload.of(pki_paths, "auth"))
    async with other as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/t.Slow/Wait")(b"0", timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/t.Slow/Nope")(b"0", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
