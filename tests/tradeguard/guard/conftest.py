"""The guard in front of the echo service, fed by a small in-test auth service, all over mutual TLS."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.tradeguard.guard.fake_auth import AUDIENCE, ISSUER, RunningAuth, small_auth
from tradeguard.echo import ECHO, EchoServicer, RunningEcho, running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.guard import GuardConfig, GuardSettings, MountedGuard, guard_for
from tradeguard.guard.client import authenticated_channel
from tradeguard.mesh import pki, tls
from tradeguard.principal import Principal, current_principal
from tradeguard.testing import eventually

ECHO_METHOD = f"/{ECHO}/Echo"
EXPAND = f"/{ECHO}/Expand"
COLLECT = f"/{ECHO}/Collect"
PERMISSIONS = {ECHO_METHOD: "orders:read", EXPAND: "orders:read", COLLECT: "orders:write"}
CALLERS = frozenset({"ops", "edge", "monitor"})


def describe(principal: Principal | None) -> str:
    if principal is None:
        return "nobody"
    scopes = ",".join(sorted(principal.scopes))
    return f"{principal.user_id}|{principal.account_id}|{principal.key_id or '-'}|{scopes}|{principal.tier}"


class WhoEcho(EchoServicer):
    """Answers with who the guard said is calling."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(text=describe(current_principal()))

    async def Expand(self, request: echo_pb2.ExpandRequest, context: Any) -> Any:
        for index in range(request.count):
            yield echo_pb2.ExpandResponse(text=describe(current_principal()), index=index)

    async def Collect(self, request_iterator: Any, context: Any) -> echo_pb2.CollectResponse:
        texts = [request.text async for request in request_iterator]
        return echo_pb2.CollectResponse(text=describe(current_principal()), count=len(texts))


@dataclass
class Guarded:
    echo: RunningEcho
    guard: MountedGuard
    auth: RunningAuth
    paths: pki.PkiPaths

    def channel(
        self, authentication: list[grpc.aio.ClientInterceptor], caller: str = "ops"
    ) -> grpc.aio.Channel:
        return authenticated_channel(
            self.echo.target, "echo", tls.Workload.of(self.paths, caller), authentication
        )


@contextlib.asynccontextmanager
async def guarded_echo(
    paths: pki.PkiPaths,
    auth: RunningAuth,
    *,
    permissions: Mapping[str, str] = PERMISSIONS,
    public: Collection[str] = (),
    max_outage_s: float = 5.0,
) -> AsyncIterator[Guarded]:
    if not paths.cert("echo").exists():
        pki.issue(paths, "echo")
    settings = GuardSettings(
        auth_target=auth.target, issuer=ISSUER, audience=AUDIENCE, max_outage_s=max_outage_s
    )
    guard = guard_for(
        GuardConfig(services=[ECHO], permissions=permissions, public=public, settings=settings),
        workload=tls.Workload.of(paths, "echo"),
        trust_domain=pki.trust_domain(paths),
    )
    rules = {f"/{ECHO}/*": CALLERS}
    async with guard, running_echo(paths, rules=rules, layers=[guard.layer], servicer=WhoEcho()) as echo:
        await eventually(lambda: guard.revocations.is_up, 10)
        yield Guarded(echo, guard, auth, paths)


@pytest.fixture
async def auth(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningAuth]:
    async with small_auth(pki_paths) as running:
        yield running


@pytest.fixture
async def guarded(pki_paths: pki.PkiPaths, auth: RunningAuth) -> AsyncIterator[Guarded]:
    async with guarded_echo(pki_paths, auth) as running:
        yield running
