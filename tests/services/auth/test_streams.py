"""Revocation streams that guards cancel and reopen must never take the auth service down."""

from __future__ import annotations

import asyncio
import secrets

from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import AuthServices
from tradeguard.auth.v1 import auth_pb2, auth_pb2_grpc
from tradeguard.guard.auth_client import AuthClient


async def test_cancelled_revocation_streams_leave_the_service_serving(auth_services: AuthServices) -> None:
    """The per-RPC log line of a stream was written after the call had ended (its generator closed later by the
    event loop), reading the peer from a finished call: the auth process died of a segmentation fault after a
    guard had cancelled a few streams. Every stream here is opened, cancelled, and the process must live on."""
    async with auth_services.channel("ops") as ops:
        for _ in range(5):  # a backlog, so that each stream is suspended at a yield when it is cancelled
            await auth_pb2_grpc.AuthServiceStub(ops).RevokeTokens(
                auth_pb2.RevokeTokensRequest(jti=secrets.token_hex(8)), timeout=10
            )
    async with auth_services.channel("trading") as channel:
        for _ in range(100):
            streams = [AuthClient(channel).open(1) for _ in range(5)]
            await asyncio.gather(*(stream.ready() for stream in streams))
            for stream in streams:
                await anext(aiter(stream))  # one revocation received, more on their way
                stream.cancel()
        assert auth_services.auth.poll() is None, f"the auth service exited ({auth_services.auth.returncode})"
    async with auth_services.channel("ops") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert auth_services.auth.poll() is None
