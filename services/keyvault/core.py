"""The key vault's core: the `KeyVault` facade over its jobs, each in a module of its own. No gRPC.

- `sealing`: the root key: start, unseal, seal, the root check and the fence against a moved key ring;
- `key_cache`: unwrapped keys in memory, trusted for a freshness window, confirmed by cheap stamp reads (its
  docstring states the security of the window);
- `usage`: encryptions counted per key version, rotation once a version has done enough;
- `key_admin`: create, read, list, rotate, configure and delete keys; scheduled rotation;
- `key_use`: encrypt, decrypt, rewrap, data keys, sign, verify, HMAC;
- `secret_store`: versioned secrets, each version under its own data key;
- `access`: the policy check and the log record every operation shares.

Every public operation takes the caller's service name (from its verified SPIFFE ID) and checks, in this order:
the arguments' syntax, the caller's permission (before existence: a denied caller learns nothing), that the vault
is unsealed, then existence. Every operation is logged (operation, caller, resource, version, outcome) without
any material: no plaintext, key, ciphertext, signature or passphrase ever reaches the log. Time and randomness
are injected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from structlog.typing import FilteringBoundLogger

from services.keyvault.access import Access
from services.keyvault.errors import DomainError
from services.keyvault.key_admin import KeyAdmin
from services.keyvault.key_cache import DEFAULT_KEY_FRESHNESS_US, KeyCache
from services.keyvault.key_use import KeyUse
from services.keyvault.model import Clock, DataKey, KeyType, Random, SealStatus, SecretVersionInfo, StoredKey
from services.keyvault.policy import DEFAULT_POLICY, Policy
from services.keyvault.root import RootKey
from services.keyvault.sealing import Sealing, Unsealer
from services.keyvault.secret_store import SecretStore
from services.keyvault.store import VaultStore
from services.keyvault.usage import DEFAULT_MAX_ENCRYPTIONS, DEFAULT_USAGE_FLUSH_EVERY, UsageCounter
from tradeguard.observability.logging import get_logger

__all__ = [
    "DEFAULT_KEY_FRESHNESS_US",
    "DEFAULT_MAX_ENCRYPTIONS",
    "DEFAULT_USAGE_FLUSH_EVERY",
    "DataKey",
    "KeyVault",
    "SealStatus",
    "Unsealer",
]


class KeyVault:
    """The key vault: one object the servicer (and the operator's commands) call; each job is delegated."""

    def __init__(
        self,
        store: VaultStore,
        policy: Policy = DEFAULT_POLICY,
        *,
        clock: Clock,
        random: Random = os.urandom,
        root: RootKey | None = None,
        unsealer: Unsealer | None = None,
        root_kind: str = "local",
        logger: FilteringBoundLogger | None = None,
        max_encryptions_per_version: int = DEFAULT_MAX_ENCRYPTIONS,
        usage_flush_every: int = DEFAULT_USAGE_FLUSH_EVERY,
        key_freshness_us: int = DEFAULT_KEY_FRESHNESS_US,
    ) -> None:
        access = Access(policy, logger if logger is not None else get_logger("keyvault"))
        self._sealing = Sealing(store, access, root=root, unsealer=unsealer, root_kind=root_kind)
        cache = KeyCache(store, self._sealing, clock=clock, key_freshness_us=key_freshness_us)
        self._usage = UsageCounter(
            store,
            access,
            self._sealing,
            self._rotate_exhausted,
            max_encryptions_per_version=max_encryptions_per_version,
            usage_flush_every=usage_flush_every,
        )
        self._admin = KeyAdmin(store, access, self._sealing, cache, self._usage, clock=clock, random=random)
        self._use = KeyUse(access, cache, self._usage, random=random)
        self._secrets = SecretStore(store, access, self._sealing, clock=clock, random=random)

    async def _rotate_exhausted(self, name: str, version: int) -> bool:
        return await self._admin.rotate_exhausted(name, version)

    # --- sealing ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Install the root key given at construction (if any): the vault starts unsealed."""
        await self._sealing.start()

    @property
    def sealed(self) -> bool:
        return self._sealing.sealed

    def seal_status(self) -> SealStatus:
        return self._sealing.status()

    async def unseal(self, caller: str | None, passphrase: str) -> SealStatus:
        return await self._sealing.unseal(caller, passphrase)

    def seal(self) -> None:
        """Forget the root key and every unwrapped key (operators' emergency stop, and tests)."""
        self._sealing.seal()

    async def close(self) -> None:
        """Store the pending encryption counts, then forget the root key and every unwrapped key."""
        await self._usage.flush_all()
        self._sealing.close()

    # --- key administration -----------------------------------------------------------------------------------
    async def create_key(
        self,
        caller: str | None,
        name: str,
        key_type: KeyType,
        *,
        auto_rotate_period_us: int = 0,
        deletion_allowed: bool = False,
    ) -> StoredKey:
        return await self._admin.create_key(
            caller,
            name,
            key_type,
            auto_rotate_period_us=auto_rotate_period_us,
            deletion_allowed=deletion_allowed,
        )

    async def get_key(self, caller: str | None, name: str) -> StoredKey:
        return await self._admin.get_key(caller, name)

    async def list_keys(
        self, caller: str | None, page_size: int, page_token: str
    ) -> tuple[list[StoredKey], str]:
        """Keys the caller may read, by name, after `page_token` (the last name of the previous page)."""
        return await self._admin.list_keys(caller, page_size, page_token)

    async def rotate_key(self, caller: str | None, name: str) -> StoredKey:
        return await self._admin.rotate_key(caller, name)

    async def update_key_config(
        self,
        caller: str | None,
        name: str,
        *,
        min_decryption_version: int | None = None,
        auto_rotate_period_us: int | None = None,
        deletion_allowed: bool | None = None,
    ) -> StoredKey:
        return await self._admin.update_key_config(
            caller,
            name,
            min_decryption_version=min_decryption_version,
            auto_rotate_period_us=auto_rotate_period_us,
            deletion_allowed=deletion_allowed,
        )

    async def delete_key(self, caller: str | None, name: str) -> None:
        await self._admin.delete_key(caller, name)

    async def rotate_due(self) -> list[str]:
        """Rotate every key whose automatic rotation period has passed, or whose latest version is exhausted."""
        return await self._admin.rotate_due()

    # --- use of keys ------------------------------------------------------------------------------------------
    async def encrypt(
        self, caller: str | None, name: str, plaintext: bytes, associated_data: bytes = b""
    ) -> str:
        return await self._use.encrypt(caller, name, plaintext, associated_data)

    async def decrypt(
        self, caller: str | None, name: str, ciphertext: str, associated_data: bytes = b""
    ) -> bytes:
        return await self._use.decrypt(caller, name, ciphertext, associated_data)

    async def batch_encrypt(
        self, caller: str | None, name: str, items: Sequence[tuple[bytes, bytes]]
    ) -> list[str | DomainError]:
        """Each (plaintext, associated data) sealed under the latest version; a failed item fails alone."""
        return await self._use.batch_encrypt(caller, name, items)

    async def batch_decrypt(
        self, caller: str | None, name: str, items: Sequence[tuple[str, bytes]]
    ) -> list[bytes | DomainError]:
        """Each (ciphertext, associated data) opened; a failed item is its own opaque `DecryptionFailed`."""
        return await self._use.batch_decrypt(caller, name, items)

    async def rewrap(
        self, caller: str | None, name: str, ciphertext: str, associated_data: bytes = b""
    ) -> str:
        """The same plaintext sealed under the latest version; the plaintext never leaves the vault."""
        return await self._use.rewrap(caller, name, ciphertext, associated_data)

    async def generate_data_key(
        self, caller: str | None, name: str, associated_data: bytes = b"", *, include_plaintext: bool = True
    ) -> DataKey:
        """A random AES-256 data key sealed under `name` (envelope encryption); the plaintext only if asked."""
        return await self._use.generate_data_key(
            caller, name, associated_data, include_plaintext=include_plaintext
        )

    async def sign(self, caller: str | None, name: str, message: bytes) -> str:
        return await self._use.sign(caller, name, message)

    async def verify(self, caller: str | None, name: str, message: bytes, signature: str) -> bool:
        """An Ed25519 signature (VERIFY right) or an HMAC (only with the HMAC right on that key)."""
        return await self._use.verify(caller, name, message, signature)

    async def hmac(self, caller: str | None, name: str, data: bytes) -> str:
        return await self._use.hmac(caller, name, data)

    # --- the secret store -------------------------------------------------------------------------------------
    async def put_secret(
        self, caller: str | None, owner: str, path: str, value: bytes, *, cas_version: int | None = None
    ) -> SecretVersionInfo:
        """A new version; with `cas_version`, only if the newest version is that one (0: none yet)."""
        return await self._secrets.put_secret(caller, owner, path, value, cas_version=cas_version)

    async def get_secret(
        self, caller: str | None, owner: str, path: str, version: int = 0
    ) -> tuple[bytes, SecretVersionInfo]:
        """The value of a version (0: the newest)."""
        return await self._secrets.get_secret(caller, owner, path, version)

    async def list_secret_versions(
        self, caller: str | None, owner: str, path: str
    ) -> list[SecretVersionInfo]:
        return await self._secrets.list_secret_versions(caller, owner, path)

    async def destroy_secret_version(self, caller: str | None, owner: str, path: str, version: int) -> None:
        await self._secrets.destroy_secret_version(caller, owner, path, version)
