"""Wiring of the key vault: settings → store → root key → core → servicer → MeshServer.

With its passphrase (or PIN) configured (a `…_FILE`, or the environment) the vault starts unsealed; without it,
it starts sealed and answers UNAVAILABLE until an operator calls Unseal. The start-up secret is taken out of the
settings when used, so no reference to it outlives the unsealing. Automatic rotation runs every `rotation_check_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from services.keyvault.core import KeyVault
from services.keyvault.policy import DEFAULT_POLICY, METHOD_RULES, Policy
from services.keyvault.root import LocalSealedRoot, Pkcs11Root, RootKey
from services.keyvault.servicer import KeyVaultServicer
from services.keyvault.settings import Settings
from services.keyvault.store import VaultStore
from services.keyvault.store_postgres import PostgresVaultStore
from services.keyvault.store_sqlite import SqliteVaultStore
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.server import MeshServer, Service, serve
from tradeguard.observability.logging import configure_logging, get_logger
from tradeguard.storage import clock_us, sqlite_path

FULL_NAME = "tradeguard.keyvault.v1.KeyVaultService"

_log = get_logger("keyvault.server")


async def open_store(url: str) -> VaultStore:
    path = sqlite_path(url)
    if path is not None:
        return await SqliteVaultStore.open(path)
    return await PostgresVaultStore.open(url)


def unsealer(settings: Settings) -> Callable[[str], RootKey]:
    """Passphrase (or PIN) → root key. A local root is created by the first passphrase if none exists."""

    def local(passphrase: str) -> RootKey:
        if not settings.root_path.exists():
            return LocalSealedRoot.create(
                settings.root_path, passphrase, os.urandom, scrypt_n=settings.scrypt_n
            )
        return LocalSealedRoot.unseal(settings.root_path, passphrase, os.urandom)

    def pkcs11(pin: str) -> RootKey:
        return Pkcs11Root.open(settings.pkcs11_module, settings.pkcs11_token, pin, settings.pkcs11_key_label)

    return pkcs11 if settings.root_mode == "pkcs11" else local


@dataclass
class Built:
    server: MeshServer
    vault: KeyVault
    store: VaultStore

    async def close(self) -> None:
        await self.vault.close()
        await self.store.close()


async def build(settings: Settings) -> Built:
    store = await open_store(settings.database_url)
    try:
        policy = (
            Policy.from_json(settings.policy_path.read_text()) if settings.policy_path else DEFAULT_POLICY
        )
        unseal = unsealer(settings)
        secret = settings.startup.take()
        root = await asyncio.to_thread(unseal, secret) if secret else None
        del secret
        vault = KeyVault(
            store,
            policy,
            clock=clock_us,
            root=root,
            unsealer=unseal,
            root_kind=settings.root_mode,
            max_encryptions_per_version=settings.max_encryptions_per_version,
            key_freshness_us=round(settings.key_freshness_s * 1_000_000),
        )
        await vault.start()
    except BaseException:
        await store.close()
        raise
    if vault.sealed:
        _log.warning("keyvault.started_sealed", root_kind=settings.root_mode)
    trust_domain = pki.trust_domain(settings.server.pki)
    servicer = KeyVaultServicer(vault, trust_domain)
    server = MeshServer(
        settings.server,
        MethodPolicy(trust_domain, METHOD_RULES),
        [Service(FULL_NAME, lambda s: keyvault_pb2_grpc.add_KeyVaultServiceServicer_to_server(servicer, s))],
    )
    return Built(server, vault, store)


async def rotate_periodically(vault: KeyVault, every_s: float) -> None:
    """Automatic rotation: check every `every_s` seconds while unsealed; a failure is logged, never fatal."""
    while True:
        await asyncio.sleep(every_s)
        if vault.sealed:
            continue
        try:
            rotated = await vault.rotate_due()
        except Exception as error:  # keep rotating on the next tick
            _log.error("keyvault.auto_rotate_failed", error=type(error).__name__)
        else:
            if rotated:
                _log.info("keyvault.auto_rotated", keys=rotated)


async def run(settings: Settings) -> None:
    built = await build(settings)
    rotation = asyncio.create_task(rotate_periodically(built.vault, settings.rotation_check_s))

    async def on_stop() -> None:
        rotation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rotation
        await built.close()

    await serve(built.server, on_stop=on_stop)


def main() -> None:
    configure_logging()
    asyncio.run(run(Settings.from_env()))
