"""The auth service, declared once: the kit's runner (tradeguard.service) turns this into a running server.

What `build` wires, in order:
- records: the store the runner opened (SQLite by default, PostgreSQL by URL);
- hot state: in process (`MemoryHotState`) or Redis when TRADEGUARD_AUTH_REDIS_URL is set (`RedisHotState`,
  shared by replicas); closed by a closer;
- the key vault: a `MeshChannel` to it as workload `auth` (closed by a closer) and the `VaultClient` on it
  (sealing, JWT signing); its keys must exist (`tradeguard up` and the tests create them as ops);
- the cores: `Rbac` (roles seeded on first start), `TokenService`, `UserService`, `ApiKeyService` (the
  users' and the keys' lockouts count in the same hot state under the same `settings.lockout`);
- for Envoy's Check (services/auth/ext_authz.py), mounted on the same server (`Assembly.extra_services`): the
  kit's JWT verifier (tradeguard.guard.jwt) over this service's own JWKS and a revocation set fed in process from
  the hot state by a background task, the JWKS refreshed every 5 minutes (the same rules as every guard, no
  RPC to itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Final

from services.auth import ext_authz, policy
from services.auth.ext_authz import ExtAuthzServicer, Routes, SignedVerdict
from services.auth.hot import HotState
from services.auth.hot_memory import MemoryHotState
from services.auth.hot_redis import RedisHotState
from services.auth.keys import ApiKeyService
from services.auth.model import User
from services.auth.rbac import Rbac
from services.auth.servicer import AuthServicer
from services.auth.settings import Settings
from services.auth.store import AuthStore
from services.auth.store_postgres import PostgresAuthStore
from services.auth.store_sqlite import SqliteAuthStore
from services.auth.tokens import TokenService
from services.auth.users import UserService
from services.auth.vault_client import VaultClient
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard.jwt import JwksCache, JwtVerifier
from tradeguard.guard.revocations import Kind, RevocationSet, Revoked
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import Service
from tradeguard.observability.logging import get_logger
from tradeguard.principal import Principal
from tradeguard.service import Assembly, Closer, Declaration, Stores, Wiring
from tradeguard.signing import SignedRequest
from tradeguard.storage import clock_us

__all__ = ["RECORDED", "SERVICE", "CoreAuthenticator", "RevocationFeed", "build"]

_log = get_logger("auth.service")

WORKLOAD: Final = "auth"  # who the auth service is to the key vault
REVOCATION_WAIT_S: Final = 1.0
JWKS_REFRESH_S: Final = 300.0
_BACKOFF_FIRST_S: Final = 0.05
_BACKOFF_MAX_S: Final = 2.0

#: The auth service's security events (tradeguard.audit.recording): method → the action recorded.
RECORDED: Final = {
    "CreateUser": "user.create",
    "SetUserRoles": "user.set_roles",
    "SetRolePermissions": "role.set_permissions",
    "UnlockUser": "user.unlock",
    "BeginTotpEnrollment": "mfa.enroll",
    "ConfirmTotpEnrollment": "mfa.confirm",
    "Login": "login",
    "VerifyMfa": "mfa.verify",
    "RefreshToken": "token.refresh",
    "Logout": "logout",
    "RevokeTokens": "token.revoke",
    "CreateApiKey": "api_key.create",
    "RotateApiKey": "api_key.rotate",
    "RevokeApiKey": "api_key.revoke",
}


class RevocationFeed:
    """Feeds a `RevocationSet` from the hot state in process, as a guard's stream would (it resumes after the last
    sequence applied; the set counts as down while the hot state fails, so the fail-closed rule applies)."""

    def __init__(
        self, hot: HotState, revocations: RevocationSet, *, wait_s: float = REVOCATION_WAIT_S
    ) -> None:
        self._hot = hot
        self.revocations = revocations
        self._wait_s = wait_s

    async def sync(self, wait_s: float = 0.0) -> None:
        """Apply what was published after the last sequence applied (waiting up to `wait_s` for something)."""
        found = await self._hot.revocations_after(self.revocations.last_sequence, wait_s=wait_s)
        self.revocations.stream_up()
        for revocation in found:
            self.revocations.apply(
                Revoked(
                    sequence=revocation.sequence,
                    kind=Kind(revocation.kind.value),
                    value=revocation.value,
                    revoke_time_us=revocation.revoke_time_us,
                    expire_time_us=revocation.expire_time_us,
                )
            )

    async def run(self) -> None:
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                await self.sync(self._wait_s)
                delay = _BACKOFF_FIRST_S
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis unreachable: down (fail closed after the outage budget), retry
                self.revocations.stream_down()
                _log.warning("auth.revocation_feed_down", error=type(error).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)


class CoreAuthenticator:
    """`ext_authz.EdgeAuthenticator` over the cores: bearer tokens by the kit's `JwtVerifier`, signed requests by
    the `ApiKeyService`."""

    def __init__(self, jwt: JwtVerifier, keys: ApiKeyService) -> None:
        self._jwt = jwt
        self._keys = keys

    async def bearer(self, token: str, cert_thumbprint: str | None) -> Principal:
        return await self._jwt.verify(token, lambda: cert_thumbprint)

    async def signed(self, request: SignedRequest) -> SignedVerdict:
        (verdict,) = await self._keys.verify([request])
        return SignedVerdict(verdict.principal, verdict.permission_denied)


async def open_hot_state(settings: Settings) -> HotState:
    if settings.redis is None:
        return MemoryHotState(clock_us)
    return await RedisHotState.open(settings.redis, clock=clock_us)


def vault_channel(settings: Settings) -> MeshChannel:
    """The channel to the key vault, as workload `auth` (its certificate from the same PKI as the server's)."""
    workload = tls.Workload.of(settings.server.pki, WORKLOAD)
    return MeshChannel(settings.keyvault_target, settings.keyvault_server_name, workload)


async def build(wiring: Wiring[Settings, AuthStore]) -> Assembly:
    settings, store = wiring.settings, wiring.store
    closers: list[Closer] = []
    try:
        hot = await open_hot_state(settings)
        closers.append(hot.close)
        channel = vault_channel(settings)
        closers.append(channel.close)
        vault = VaultClient(channel, credentials_key=settings.credentials_key, jwt_key=settings.jwt_key)
        rbac = Rbac(store, clock_us, mfa_permissions=settings.mfa_required_permissions)
        await rbac.load()

        async def load_user(user_id: str) -> tuple[User, frozenset[str]] | None:
            user = await store.get_user(user_id)
            if user is None:
                return None
            await rbac.refresh_if_stale()
            return user, rbac.permissions_of(user.roles)

        tokens = TokenService(store, hot, vault, clock_us, os.urandom, settings)
        users = UserService(store, hot, vault, tokens, rbac, clock_us, os.urandom, settings)
        keys = ApiKeyService(store, hot, vault, clock_us, os.urandom, settings, load_user)

        revocations = RevocationSet(clock_us)
        feed = RevocationFeed(hot, revocations)
        await feed.sync()  # up before the first Check: no token is accepted before the revocations are known
        jwks = JwksCache(tokens.jwks_json, algorithms=settings.jwt_algorithms)
        verifier = JwtVerifier(
            jwks,
            settings.issuer,
            settings.audience,
            revocations=revocations,
            algorithms=settings.jwt_algorithms,
            clock_us=clock_us,
        )
        check = ExtAuthzServicer(
            CoreAuthenticator(verifier, keys),
            Routes(settings.route_permissions),
            settings.hsts,
            wiring.recorder,  # refusals at the edge recorded in the audit service
        )
        servicer = AuthServicer(
            users, rbac, tokens, keys, hot, load_user, wiring.trust_domain, clock_us=clock_us
        )
    except BaseException:
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                await closer()
        raise

    async def feed_revocations() -> None:
        await feed.run()

    async def refresh_jwks() -> None:
        """As every guard does: a key the vault retired stops verifying here within `JWKS_REFRESH_S` (an unknown
        kid refreshes at once)."""
        while True:
            await asyncio.sleep(JWKS_REFRESH_S)
            await jwks.refresh()  # a failure is logged and the keys kept

    return Assembly(
        servicer,
        tasks=[feed_revocations, refresh_jwks],
        closers=closers,
        core=users,
        extra_services=[Service(ext_authz.FULL_NAME, ext_authz.register(check))],
    )


SERVICE: Declaration[Settings, AuthStore] = Declaration(
    name="auth",
    summary="The auth service: users, TOTP, JWTs, signed API keys, RBAC, lockout, revocation; Envoy's ext_authz.",
    register=auth_pb2_grpc.add_AuthServiceServicer_to_server,
    rules=lambda settings: policy.rules(settings.guard_workloads),
    settings=Settings.read,
    stores=Stores(sqlite=SqliteAuthStore.open, postgres=PostgresAuthStore.open),
    build=build,
    recorded=RECORDED,
)
