"""The guard in front of the echo service, fed by the session's real auth service (and key vault) and counting
calls at the session's real rate-limit service, all over mutual TLS.

The guard calls the auth and rate-limit services as the echo service's own workload, `echo`: the session's services
list it in TRADEGUARD_AUTH_GUARD_WORKLOADS and TRADEGUARD_RATELIMIT_GUARD_WORKLOADS (tests/support.py
GUARD_WORKLOADS), as a firm lists its own guarded services. The limits are generous (tests/support.py TEST_LIMITS)
but for keys of the `tight` tier.
Users, tokens and API keys are made per test through the
auth service's RPCs (unique names), tokens by a real login.

`Guarded.sent` records each signed request the guard sent to the auth service (a pass-through around the guard's
own VerifySignedRequests call: the real call is made, its answer returned unchanged), and `Guarded.since` each
`since_sequence` the guard's revocation stream asked for: what the guard told the auth service, observed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest

from services.auth.vault_client import VaultClient
from tests.support import AuthServices, create_api_key, create_auth_user, log_in
from tests.tradeguard.guard.tokens import RealKeySigner
from tradeguard.auth.v1 import auth_pb2 as auth_pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.echo import ECHO, EchoServicer, RunningEcho, running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.guard import GuardConfig, GuardSettings, MountedGuard, guard_for
from tradeguard.guard.client import ApiKeyCredentials, authenticated_channel
from tradeguard.mesh import pki, tls
from tradeguard.principal import Principal, current_principal
from tradeguard.signing import SignedRequest
from tradeguard.testing import eventually

ECHO_METHOD = f"/{ECHO}/Echo"
EXPAND = f"/{ECHO}/Expand"
COLLECT = f"/{ECHO}/Collect"
PERMISSIONS = {ECHO_METHOD: "orders:read", EXPAND: "orders:read", COLLECT: "orders:write"}
CALLERS = frozenset({"ops", "edge", "monitor", "trading-client"})


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
    auth: AuthServices
    paths: pki.PkiPaths
    auth_target: str
    sent: list[SignedRequest] = field(default_factory=list)
    since: list[int] = field(default_factory=list)

    def channel(
        self, authentication: list[grpc.aio.ClientInterceptor], caller: str = "ops"
    ) -> grpc.aio.Channel:
        return authenticated_channel(
            self.echo.target, "echo", tls.Workload.of(self.paths, caller), authentication
        )

    def auth_channel(self, caller: str = "ops") -> grpc.aio.Channel:
        """A channel to the auth service this guard uses, as workload `caller`."""
        return authenticated_channel(self.auth_target, "auth", tls.Workload.of(self.paths, caller), [])

    async def token(
        self, roles: tuple[str, ...] = ("trader",), account: str | None = None, caller: str = "ops"
    ) -> tuple[auth_pb.User, str]:
        """A new user (`roles`, of `account` or an account of its own) and its access token, logged in for real
        as workload `caller` (the token is bound to that certificate)."""
        services = self.services
        user = await create_auth_user(services, account, roles)
        return user, await log_in(services, user, caller)

    async def key(
        self,
        scopes: str = "orders:read orders:write",
        *,
        account: str | None = None,
        tier: str = "",
        ed25519_seed: bytes | None = None,
    ) -> tuple[auth_pb.User, ApiKeyCredentials]:
        """A new trader (of `account` or an account of its own) and an API key of theirs with `scopes`."""
        services = self.services
        user = await create_auth_user(services, account)
        credentials = await create_api_key(
            services, user.user_id, scopes, tier=tier, ed25519_seed=ed25519_seed
        )
        return user, credentials

    async def revoke(self, **target: str) -> None:
        """RevokeTokens (jti=, family_id=, user_id=) or, for key_id=, RevokeApiKey, as `ops`."""
        async with self.auth_channel("ops") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            if "key_id" in target:
                await stub.RevokeApiKey(auth_pb.RevokeApiKeyRequest(key_id=target["key_id"]), timeout=10)
            else:
                await stub.RevokeTokens(auth_pb.RevokeTokensRequest(**target), timeout=10)

    @property
    def services(self) -> AuthServices:
        """The auth service this guard uses (the session's, or another one on the session's key vault)."""
        return replace(self.auth, auth_target=self.auth_target)


def _observe(guard: MountedGuard, sent: list[SignedRequest], since: list[int]) -> None:
    """Record what the guard sends to the auth service (see the module); the real calls are made unchanged."""
    batcher = guard.signed.batcher
    verify_batch = batcher._run_batch  # the guard's AuthClient.verify_batch

    async def recording(requests: Sequence[SignedRequest]) -> Any:
        sent.extend(requests)
        return await verify_batch(requests)

    batcher._run_batch = recording
    open_stream = guard.auth.open

    def opening(since_sequence: int) -> Any:
        since.append(since_sequence)
        return open_stream(since_sequence)

    guard.auth.open = opening  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def guarded_echo(
    paths: pki.PkiPaths,
    auth: AuthServices,
    *,
    auth_target: str | None = None,
    permissions: Mapping[str, str] = PERMISSIONS,
    public: Collection[str] = (),
    unmetered: Collection[str] = (),
    max_outage_s: float = 5.0,
    ratelimit_target: str | None = None,
    audit_target: str | None = None,
) -> AsyncIterator[Guarded]:
    """The echo service behind a guard that verifies callers at `auth_target` (default: the session's auth) and
    counts their calls at `ratelimit_target` (default: the session's rate-limit service) and records them at
    `audit_target` (default: the session's audit service)."""
    if not paths.cert("echo").exists():
        pki.issue(paths, "echo")
    target = auth_target or auth.auth_target
    settings = GuardSettings(  # iss, aud: the auth's defaults
        auth_target=target,
        max_outage_s=max_outage_s,
        ratelimit_target=ratelimit_target or auth.ratelimit_target,
        audit_target=audit_target or auth.audit_target,
    )
    guard = guard_for(
        GuardConfig(
            services=[ECHO], permissions=permissions, public=public, unmetered=unmetered, settings=settings
        ),
        workload=tls.Workload.of(paths, "echo"),
        trust_domain=pki.trust_domain(paths),
    )
    rules = {f"/{ECHO}/*": CALLERS}
    sent: list[SignedRequest] = []
    since: list[int] = []
    _observe(guard, sent, since)
    async with guard, running_echo(paths, rules=rules, layers=[guard.layer], servicer=WhoEcho()) as echo:
        await eventually(lambda: guard.revocations.is_up, 10)
        yield Guarded(echo, guard, auth, paths, target, sent, since)


@pytest.fixture
def auth(auth_services: AuthServices) -> AuthServices:
    return auth_services


@pytest.fixture
async def guarded(pki_paths: pki.PkiPaths, auth: AuthServices) -> AsyncIterator[Guarded]:
    async with guarded_echo(pki_paths, auth) as running:
        yield running


@pytest.fixture
async def signer(auth: AuthServices) -> AsyncIterator[RealKeySigner]:
    """Crafted tokens signed with the auth service's real JWT key (tests/tradeguard/guard/tokens.py)."""
    async with auth.vault_channel("auth") as channel:
        yield RealKeySigner(VaultClient(channel))
