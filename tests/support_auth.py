"""The real key vault and auth service over mutual TLS, for tests that need them in process; users and API keys.

`running_keyvault` starts the key vault as production does and creates the auth service's keys in it (as `ops`);
`real_auth` starts the auth service beside it. `create_hmac_key` makes an HMAC API key through the real RPC
(users, TOTP enrolment and logins: tests/services/auth/auth_support.py); `RealAuth` keeps one user per account and
one key per (account, scopes).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.auth.service import SERVICE as AUTH
from services.auth.vault_client import ensure_keys
from services.keyvault.service import SERVICE as KEYVAULT
from services.keyvault.settings import Settings as KeyVaultSettings
from services.keyvault.settings import StartupSecret
from tests.services.auth.auth_support import PASSWORD, auth_settings
from tests.support import NOT_RECORDED
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import RunningService, running_service


def keyvault_settings(
    home: Path, passphrase: str, *, name: str = "keyvault", **overrides: Any
) -> KeyVaultSettings:
    """The key vault's settings for a test: a free port, its database and root key file `home/data/NAME.*`,
    unsealed by `passphrase` (cheap scrypt)."""
    settings = KeyVaultSettings(
        server=ServerConfig(name="keyvault", port=0, home=home, grace_s=1.0),
        database_url=f"sqlite:///{home / 'data' / f'{name}.db'}",
        root_path=home / "data" / f"{name}.root",
        startup=StartupSecret(passphrase),
        scrypt_n=2**10,
        recording=NOT_RECORDED,
    )
    return replace(settings, **overrides)


@contextlib.asynccontextmanager
async def running_keyvault(
    paths: pki.PkiPaths, settings: KeyVaultSettings
) -> AsyncIterator[RunningService[KeyVaultSettings, Any]]:
    """The real key vault over mutual TLS, as production starts it, with the auth service's keys created (as
    `ops`)."""
    async with running_service(KEYVAULT, settings, paths) as keyvault:
        async with keyvault.channel("ops") as ops:
            await ensure_keys(ops)
        yield keyvault


async def create_hmac_key(
    ops: auth_pb2_grpc.AuthServiceAsyncStub,
    user_id: str,
    scopes: Sequence[str],
    *,
    ip_allow_list: Sequence[str] = ("127.0.0.1/32",),
    **fields: Any,
) -> ApiKeyCredentials:
    """An HMAC API key of `user_id` with `scopes`, usable from `ip_allow_list`, created through `ops` (a stub on a
    channel of workload `ops`); `fields`: more of CreateApiKeyRequest's (tier, lifetime, label)."""
    created = await ops.CreateApiKey(
        pb.CreateApiKeyRequest(
            user_id=user_id,
            kind=pb.API_KEY_KIND_HMAC,
            scopes=scopes,
            ip_allow_list=ip_allow_list,
            **fields,
        ),
        timeout=10,
    )
    return ApiKeyCredentials(created.key.key_id, secret=created.secret)


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
                created = await create_hmac_key(
                    auth_pb2_grpc.AuthServiceStub(channel), user.user_id, scopes.split()
                )
            credentials = self.keys[account, scopes] = created
        return credentials


@contextlib.asynccontextmanager
async def real_auth(paths: pki.PkiPaths) -> AsyncIterator[RealAuth]:
    """The real key vault (the auth service's keys created as `ops`) and the real auth service, as production
    starts them, on free ports."""
    async with (
        running_keyvault(paths, keyvault_settings(paths.home, "guard test passphrase")) as keyvault,
        running_service(AUTH, auth_settings(keyvault), paths) as auth,
    ):
        yield RealAuth(auth)


def printed_commands(banner: str) -> list[str]:
    """The shell lines `tradeguard up`'s banner prints to make a trader and a key and sign an order (export,
    tradeguard and printf lines, continuations joined)."""
    commands: list[str] = []
    pending = ""
    for raw in banner.splitlines():
        line = raw.strip()
        if pending:
            pending += " " + line
        elif line.startswith(("export ", ".venv/bin/tradeguard ", "printf ")):
            pending = line
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            commands.append(pending)
            pending = ""
    return commands
