"""The key vault, declared once: the kit's runner (tradeguard.service) turns this into a running server.

With its passphrase (or PIN) configured (a `…_FILE`, or the environment) the vault starts unsealed; without it,
it starts sealed and answers UNAVAILABLE until an operator calls Unseal. The start-up secret is taken out of the
settings when used, so no reference to it outlives the unsealing. Automatic rotation runs every `rotation_check_s`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Final

from services.keyvault import migrate_cmd, passphrase_cmd
from services.keyvault.core import KeyVault
from services.keyvault.policy import DEFAULT_POLICY, METHOD_RULES, Policy
from services.keyvault.root import LocalSealedRoot, Pkcs11Root, RootKey
from services.keyvault.servicer import KeyVaultServicer
from services.keyvault.settings import Settings
from services.keyvault.store import VaultStore
from services.keyvault.store_postgres import PostgresVaultStore
from services.keyvault.store_sqlite import SqliteVaultStore
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.observability.logging import get_logger
from tradeguard.service import Assembly, Declaration, Stores, Wiring
from tradeguard.storage import clock_us

_log = get_logger("keyvault.service")


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


async def build(wiring: Wiring[Settings, VaultStore]) -> Assembly:
    settings = wiring.settings
    policy = Policy.from_json(settings.policy_path.read_text()) if settings.policy_path else DEFAULT_POLICY
    unseal = unsealer(settings)
    secret = settings.startup.take()
    root = await asyncio.to_thread(unseal, secret) if secret else None
    del secret
    vault = KeyVault(
        wiring.store,
        policy,
        clock=clock_us,
        root=root,
        unsealer=unseal,
        root_kind=settings.root_mode,
        max_encryptions_per_version=settings.max_encryptions_per_version,
        key_freshness_us=round(settings.key_freshness_s * 1_000_000),
    )
    await vault.start()
    if vault.sealed:
        _log.warning("keyvault.started_sealed", root_kind=settings.root_mode)

    async def rotate_periodically() -> None:
        """Automatic rotation: check every `rotation_check_s` seconds while unsealed; a failure is logged and
        the next tick tries again."""
        while True:
            await asyncio.sleep(settings.rotation_check_s)
            if vault.sealed:
                continue
            try:
                rotated = await vault.rotate_due()
            except Exception as error:
                _log.error("keyvault.auto_rotate_failed", error=type(error).__name__)
            else:
                if rotated:
                    _log.info("keyvault.auto_rotated", keys=rotated)

    return Assembly(
        KeyVaultServicer(vault, wiring.trust_domain),
        tasks=[rotate_periodically],
        closers=[vault.close],
        core=vault,
    )


#: The key vault's security events (tradeguard.audit.recording): key administration, every call that hands out
#: plaintext or a secret, and unsealing; method → the action recorded.
RECORDED: Final = {
    "CreateKey": "key.create",
    "RotateKey": "key.rotate",
    "UpdateKeyConfig": "key.update_config",
    "DeleteKey": "key.delete",
    "Decrypt": "key.decrypt",
    "BatchDecrypt": "key.decrypt",
    "Rewrap": "key.rewrap",
    "GenerateDataKey": "key.generate_data_key",
    "PutSecret": "secret.put",
    "GetSecret": "secret.get",
    "DestroySecretVersion": "secret.destroy",
    "Unseal": "vault.unseal",
}


SERVICE: Declaration[Settings, VaultStore] = Declaration(
    name="keyvault",
    summary="The key vault: envelope encryption, key versions and rotation, signing keys, a secret store.",
    register=keyvault_pb2_grpc.add_KeyVaultServiceServicer_to_server,
    rules=METHOD_RULES,
    settings=Settings.read,
    stores=Stores(sqlite=SqliteVaultStore.open, postgres=PostgresVaultStore.open),
    build=build,
    commands={"change-passphrase": passphrase_cmd.main, "migrate-root": migrate_cmd.main},
    recorded=RECORDED,
    # the audit service signs its checkpoints here: its calls cannot wait on the audit service itself
    unrecorded_callers=frozenset({"audit"}),
)
