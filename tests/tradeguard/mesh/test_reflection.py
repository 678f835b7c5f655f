"""Server reflection, as grpcurl uses it, lists the services and their methods (ops only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tradeguard.echo import ECHO, RunningEcho, running_echo
from tradeguard.mesh import pki, tls


def _reflect(target: str, workload: tls.Workload, server_name: str) -> tuple[list[str], list[str]]:
    creds = tls.channel_credentials(workload)
    with grpc.secure_channel(
        target, creds, options=[("grpc.ssl_target_name_override", server_name)]
    ) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        echo = DescriptorPool(db).FindServiceByName(ECHO)
        return services, [m.name for m in echo.methods]


@pytest.fixture
async def echo(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningEcho]:
    async with running_echo(pki_paths, tls12_self_probe=False) as running:
        yield running


async def test_reflection_lists_the_service_and_its_methods(echo: RunningEcho) -> None:
    services, methods = await asyncio.to_thread(
        _reflect, echo.target, tls.Workload.of(echo.paths, "ops"), echo.name
    )
    assert ECHO in services
    assert "grpc.health.v1.Health" in services
    assert methods == ["Echo", "Expand", "Collect"]


async def test_reflection_denied_to_other_workloads(echo: RunningEcho) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await asyncio.to_thread(_reflect, echo.target, tls.Workload.of(echo.paths, "monitor"), echo.name)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
