"""Server reflection, as grpcurl uses it, lists the services and their methods (ops only)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tradeguard.mesh import tls


def _reflect(target: str, workload: tls.Workload) -> tuple[list[str], list[str]]:
    creds = tls.channel_credentials(workload)
    with grpc.secure_channel(
        target, creds, options=[("grpc.ssl_target_name_override", "trading")]
    ) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        trading = pool.FindServiceByName("tradeguard.trading.v1.TradingService")
        return services, [m.name for m in trading.methods]


async def test_reflection_lists_trading_service_and_methods(trading) -> None:
    services, methods = await asyncio.to_thread(
        _reflect, trading.target, tls.Workload.of(trading.paths, "ops")
    )
    assert "tradeguard.trading.v1.TradingService" in services
    assert "grpc.health.v1.Health" in services
    assert methods == ["PlaceOrder", "CancelOrder", "GetOrder", "ListOrders"]


async def test_reflection_denied_to_other_workloads(trading) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await asyncio.to_thread(_reflect, trading.target, tls.Workload.of(trading.paths, "monitor"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
