"""Shared fixtures: one dev PKI per session, the real key vault, auth, rate-limit and audit services started once per
session as processes, and the real trading service on mutual TLS behind its guard, verified by that auth service,
counted by that rate-limit service and recorded by that audit service.

- `session_pki`: the session's CA and workload certificates (tests/support.py SESSION_WORKLOADS).
- `pki_paths`: a test's own home (`tmp_path/home`) holding a copy of the session's PKI: the same CA, so every
  service a test starts trusts (and is trusted by) the session's auth service; certificates a test issues go
  into its copy, signed by the same intermediate.
- `auth_services`: the real key vault, auth service, rate-limit service and audit service (`auth_processes`,
  the limits `TEST_LIMITS`: generous by default, a `tight` tier for the quota tests), started the first time a
  test asks for them, terminated at the end of the session; a test creates its own users and API keys (unique
  names) through the auth service's RPCs as `ops`.
- `trading`: the trading service (in process, per test) whose guard verifies callers at `auth_services`,
  counts their calls at its rate-limit service and records them at its audit service (the quota and audit stages
  are on, as in production).

`tradeguard` is imported first so that GRPC_SSL_CIPHER_SUITES is set before anything imports grpc.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import tradeguard  # noqa: F401  (sets grpc's TLS 1.3-only cipher setting before grpc loads)
from services.trading.service import SERVICE
from services.trading.settings import Settings
from tests.support import (
    SESSION_WORKLOADS,
    AuthServices,
    auth_processes,
    create_api_key,
    create_auth_user,
)
from tradeguard.guard import Guard, GuardSettings
from tradeguard.guard.client import ApiKeyCredentials, authenticated_channel, signing_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import MeshServer, ServerConfig
from tradeguard.testing import RunningService, dev_pki, eventually, running_service
from tradeguard.trading.v1 import trading_pb2_grpc

if TYPE_CHECKING:
    import grpc

WORKLOADS = SESSION_WORKLOADS


@pytest.fixture(scope="session")
def session_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiPaths:
    return dev_pki(tmp_path_factory.mktemp("session") / "home", SESSION_WORKLOADS)


@pytest.fixture
def pki_paths(session_pki: pki.PkiPaths, tmp_path: Path) -> pki.PkiPaths:
    paths = pki.PkiPaths(tmp_path / "home")
    shutil.copytree(session_pki.dir, paths.dir)
    return paths


@pytest.fixture(scope="session")
def auth_services(session_pki: pki.PkiPaths) -> Iterator[AuthServices]:
    with auth_processes(session_pki) as services:
        yield services


@dataclass
class RunningTrading:
    """The trading service behind its guard, verified by the session's real auth service."""

    service: RunningService[Settings, object]
    paths: pki.PkiPaths
    auth: AuthServices
    key: ApiKeyCredentials  # an API key (orders:read, orders:write) of a user of acct-1 made for this test

    @property
    def server(self) -> MeshServer:
        return self.service.running.server

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def target(self) -> str:
        return self.service.target

    def channel(self, caller: str = "ops") -> grpc.aio.Channel:
        """A channel as workload `caller` whose calls are signed with the API key of the test's acct-1 user."""
        return authenticated_channel(
            self.target, "trading", tls.Workload.of(self.paths, caller), signing_interceptors(self.key)
        )

    def stub(self, channel: grpc.aio.Channel) -> trading_pb2_grpc.TradingServiceAsyncStub:
        return trading_pb2_grpc.TradingServiceStub(channel)


@pytest.fixture
async def trading(pki_paths: pki.PkiPaths, auth_services: AuthServices) -> AsyncIterator[RunningTrading]:
    user = await create_auth_user(auth_services, "acct-1")
    key = await create_api_key(auth_services, user.user_id)
    home = pki_paths.home
    settings = Settings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=2.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
        # issuer, audience: the auth's defaults; the quota stage on, at the session's rate-limit service
        guard=GuardSettings(
            auth_target=auth_services.auth_target,
            ratelimit_target=auth_services.ratelimit_target,
            audit_target=auth_services.audit_target,  # every call recorded, as in production
        ),
    )
    async with running_service(SERVICE, settings, pki_paths) as running:
        guard = running.running.assembly.layers[0]
        assert isinstance(guard, Guard)
        await eventually(lambda: guard.revocations.is_up)
        yield RunningTrading(running, pki_paths, auth_services, key)
