"""Shared fixtures: a dev PKI in tmp_path and the real trading service on mutual TLS.

`tradeguard` is imported first so that GRPC_SSL_CIPHER_SUITES is set before anything imports grpc.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tradeguard  # noqa: F401  (sets grpc's TLS 1.3-only cipher setting before grpc loads)
from services.trading.service import SERVICE
from services.trading.settings import Settings
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import MeshServer, ServerConfig
from tradeguard.service import start
from tradeguard.testing import dev_pki
from tradeguard.trading.v1 import trading_pb2_grpc

WORKLOADS = ("trading", "ops", "monitor", "edge", "keyvault", "auth")


@pytest.fixture
def pki_paths(tmp_path: Path) -> pki.PkiPaths:
    return dev_pki(tmp_path / "home", WORKLOADS)


@dataclass
class RunningTrading:
    server: MeshServer
    paths: pki.PkiPaths
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, caller: str = "ops") -> MeshChannel:
        return MeshChannel(self.target, "trading", tls.Workload.of(self.paths, caller))

    def stub(self, channel: MeshChannel) -> trading_pb2_grpc.TradingServiceAsyncStub:
        return trading_pb2_grpc.TradingServiceStub(channel)


@pytest.fixture
async def trading(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningTrading]:
    home = pki_paths.home
    config = ServerConfig(name="trading", port=0, home=home, grace_s=2.0)
    settings = Settings(server=config, database_url=f"sqlite:///{home / 'data' / 'trading.db'}")
    running = await start(SERVICE, settings)
    try:
        yield RunningTrading(running.server, pki_paths, running.port)
    finally:
        await running.stop(grace=0, drain=0)
