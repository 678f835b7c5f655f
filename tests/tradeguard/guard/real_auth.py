"""The real key vault and auth service over mutual TLS, for tests of guarded services; users and API keys."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from services.auth.service import SERVICE as AUTH
from services.auth.vault_client import ensure_keys
from services.keyvault.service import SERVICE as KEYVAULT
from services.keyvault.settings import Settings as KeyVaultSettings
from services.keyvault.settings import StartupSecret
from tests.services.auth.auth_support import PASSWORD, auth_settings
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import RunningService, running_service


@dataclass
class RealAuth:
    """The running auth service (beside its key vault) and the users and keys a test made on it."""

    auth: RunningService[Any, Any]
    users: dict[str, pb.User] = field(default_factory=dict)  # by account
    keys: dict[tuple[str, str], ApiKeyCredentials] = field(default_factory=dict)  # by (account, scopes)
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def target(self) -> str:
        return self.auth.target

    async def user(self, account: str, roles: tuple[str, ...] = ("trader",)) -> pb.User:
        """A user of `account` (one per account), created by an operator."""
        user = self.users.get(account)
        if user is None:
            async with self.auth.channel("ops") as channel:
                reply = await auth_pb2_grpc.AuthServiceStub(channel).CreateUser(
                    pb.CreateUserRequest(
                        username=f"user{next(self._names)}",
                        password=PASSWORD,
                        account_id=account,
                        roles=roles,
                    ),
                    timeout=10,
                )
            user = self.users[account] = reply.user
        return user

    async def api_key(self, account: str, scopes: str = "orders:read orders:write") -> ApiKeyCredentials:
        """An HMAC API key with `scopes` of the user of `account` (made once per pair), from 127.0.0.1 only."""
        credentials = self.keys.get((account, scopes))
        if credentials is None:
            user = await self.user(account)
            async with self.auth.channel("ops") as channel:
                created = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
                    pb.CreateApiKeyRequest(
                        user_id=user.user_id,
                        kind=pb.API_KEY_KIND_HMAC,
                        scopes=scopes.split(),
                        ip_allow_list=["127.0.0.1/32"],
                    ),
                    timeout=10,
                )
            credentials = self.keys[account, scopes] = ApiKeyCredentials(
                created.key.key_id, secret=created.secret
            )
        return credentials


@contextlib.asynccontextmanager
async def real_auth(paths: pki.PkiPaths) -> AsyncIterator[RealAuth]:
    """The real key vault (the auth service's keys created as `ops`) and the real auth service, as production
    starts them, on free ports."""
    home = paths.home
    vault_settings = KeyVaultSettings(
        server=ServerConfig(name="keyvault", port=0, home=home, grace_s=1.0),
        database_url=f"sqlite:///{home / 'data' / 'keyvault.db'}",
        root_path=home / "data" / "keyvault.root",
        startup=StartupSecret("guard test passphrase"),
        scrypt_n=2**10,
    )
    async with running_service(KEYVAULT, vault_settings, paths) as keyvault:
        async with keyvault.channel("ops") as ops:
            await ensure_keys(ops)
        async with running_service(AUTH, auth_settings(keyvault), paths) as auth:
            yield RealAuth(auth)
