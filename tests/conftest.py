"""Shared fixtures: a dev PKI in tmp_path and the real trading service on mutual TLS (behind its guard, with a small
in-test auth service: tests/tradeguard/guard/fake_auth.py).

`tradeguard` is imported first so that GRPC_SSL_CIPHER_SUITES is set before anything imports grpc.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import tradeguard  # noqa: F401  (sets grpc's TLS 1.3-only cipher setting before grpc loads)
from services.trading.service import SERVICE
from services.trading.settings import Settings
from tests.tradeguard.guard.fake_auth import AUDIENCE, ISSUER, RunningAuth, small_auth
from tradeguard.guard import GuardSettings
from tradeguard.guard.client import authenticated_channel, bearer_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import MeshServer, ServerConfig
from tradeguard.service import start
from tradeguard.testing import dev_pki, eventually
from tradeguard.trading.v1 import trading_pb2_grpc

if TYPE_CHECKING:
    import grpc

WORKLOADS = ("trading", "ops", "monitor", "edge", "keyvault", "auth")


@pytest.fixture
def pki_paths(tmp_path: Path) -> pki.PkiPaths:
    return dev_pki(tmp_path / "home", WORKLOADS)


@dataclass
class RunningTrading:
    """The trading service, behind its guard, with the in-test auth service that verifies its tokens."""

    server: MeshServer
    paths: pki.PkiPaths
    port: int
    auth: RunningAuth

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, caller: str = "ops") -> grpc.aio.Channel:
        """A channel as workload `caller` whose calls carry a token of a user of acct-1 (orders:read, write)."""
        token = self.auth.servicer.issuer.token(acct="acct-1", scope="orders:read orders:write")
        return authenticated_channel(
            self.target, "trading", tls.Workload.of(self.paths, caller), bearer_interceptors(token)
        )

    def stub(self, channel: grpc.aio.Channel) -> trading_pb2_grpc.TradingServiceAsyncStub:
        return trading_pb2_grpc.TradingServiceStub(channel)


@pytest.fixture
async def trading(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningTrading]:
    home = pki_paths.home
    async with small_auth(pki_paths) as auth:
        config = ServerConfig(name="trading", port=0, home=home, grace_s=2.0)
        settings = Settings(
            server=config,
            database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
            guard=GuardSettings(auth_target=auth.target, issuer=ISSUER, audience=AUDIENCE),
        )
        running = await start(SERVICE, settings)
        try:
            await eventually(lambda: running.assembly.layers[0].revocations.is_up)  # type: ignore[attr-defined]
            yield RunningTrading(running.server, pki_paths, running.port, auth)
        finally:
            await running.stop(grace=0, drain=0)
