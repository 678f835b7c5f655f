"""Where the vault keeps its state: the `VaultStore` protocol (SQLite and PostgreSQL implement it).

Nothing but ciphertext and metadata: key material is wrapped under the root key, secret values are sealed under
their own data keys, which are wrapped under the root key. Names, paths, versions and times are in clear.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.keyvault.model import KeyConfig, KeyType, StoredKey, VersionRecord

__all__ = [
    "KEY_COLUMNS",
    "SCHEMA_VERSION",
    "SECRET_COLUMNS",
    "VERSION_COLUMNS",
    "RewrapDataKey",
    "RewrapMaterial",
    "RootChanged",
    "SecretRecord",
    "VaultStore",
    "config_from_row",
    "config_to_row",
    "secret_from_row",
    "version_from_row",
]

# The version both backends' MIGRATIONS lead to (store_sqlite.py, store_postgres.py; see
# tradeguard.storage.migrations): a change of the tables is a new migration in each backend and a bump here.
SCHEMA_VERSION = 1

RewrapMaterial = Callable[[str, int, bytes], bytes]
"""(key name, version, wrapped material) → the material wrapped under the new root."""
RewrapDataKey = Callable[[str, str, int, bytes], bytes]
"""(owner, path, version, wrapped data key) → the data key wrapped under the new root."""


class RootChanged(Exception):
    """The stored root check is not the one the caller expected: the ring moved under it; nothing written."""


@dataclass(frozen=True)
class SecretRecord:
    """One version of a secret. A destroyed version keeps its metadata; its data key and value are gone."""

    owner: str
    path: str
    version: int
    wrapped_data_key: bytes | None = field(repr=False)
    ciphertext: bytes | None = field(repr=False)
    create_us: int
    destroy_us: int = 0

    @property
    def destroyed(self) -> bool:
        return self.ciphertext is None


class VaultStore(Protocol):
    async def get_meta(self, key: str) -> bytes | None: ...

    async def put_meta_if_absent(self, key: str, value: bytes) -> bytes:
        """Store `value` unless `key` has one; return the value now stored."""
        ...

    async def create_key(self, config: KeyConfig, first: VersionRecord) -> bool:
        """Create the key with its first version; False (and no change) if the name exists."""
        ...

    async def get_key(self, name: str) -> StoredKey | None: ...

    async def list_keys(self, after: str, limit: int) -> builtins.list[StoredKey]:
        """Up to `limit` keys with names greater than `after`, by name."""
        ...

    async def key_stamp(self, name: str) -> tuple[int, int] | None:
        """(create_us, update_us) of the key, None if there is none: one indexed read, to check a cached key.

        `update_us` only grows: every change sets it to max(its time, the previous value + 1)."""
        ...

    async def add_version(
        self, name: str, record: VersionRecord, update_us: int, expected_update_us: int
    ) -> int | None:
        """Compare-and-swap: append a version and bump `update_us`, only while the stored `update_us` is
        `expected_update_us`; the new `update_us`, or None (and no change at all) if the key is gone, changed
        since it was read (a configuration change the caller would otherwise cache as unchanged), or
        `record.version` is not the next version (a concurrent rotation)."""
        ...

    async def update_config(self, config: KeyConfig, expected_update_us: int) -> int | None:
        """Compare-and-swap: write the configuration only while the stored `update_us` is `expected_update_us`;
        the new `update_us`, or None (and no change) if the key is gone or changed since it was read."""
        ...

    async def delete_key(self, name: str) -> bool: ...

    async def add_encryptions(self, name: str, version: int, count: int) -> int:
        """Add `count` to the encryptions made under a version (by every replica); the new total."""
        ...

    async def insert_secret_version(self, record: SecretRecord) -> bool:
        """False if (owner, path, version) exists."""
        ...

    async def get_secret_version(self, owner: str, path: str, version: int | None) -> SecretRecord | None:
        """The given version, or the newest one when `version` is None."""
        ...

    async def list_secret_versions(self, owner: str, path: str) -> builtins.list[SecretRecord]:
        """Every version, ascending, with data key and value left out (None)."""
        ...

    async def destroy_secret_version(self, owner: str, path: str, version: int, now_us: int) -> bool:
        """Erase the data key and value of a version; False if there is no such version."""
        ...

    def fence(self, check_key: str, expected: bytes) -> None:
        """From now on, every write of wrapped material (`create_key`, `add_version`, `insert_secret_version`)
        first checks, in its own transaction, that meta `check_key` is still `expected`, else raises
        `RootChanged` and writes nothing: a vault still holding a root the ring has moved away from can never
        wrap new material under it (which the new root could not open)."""
        ...

    async def rewrap_all(
        self,
        check_key: str,
        expected_check: bytes,
        new_check: bytes,
        material: RewrapMaterial,
        data_key: RewrapDataKey,
    ) -> tuple[int, int]:
        """In ONE transaction, while meta `check_key` is still `expected_check` (else `RootChanged`): every key
        version's material and every live secret version's data key replaced by what the callbacks return, and
        the check by `new_check`. All or nothing: a callback that raises rolls everything back. Returns
        (versions, data keys) rewrapped. Old wrapped bytes are scrubbed from any log the store keeps."""
        ...

    async def close(self) -> None: ...


KEY_COLUMNS = (
    "name",
    "type",
    "min_decryption_version",
    "auto_rotate_period_us",
    "deletion_allowed",
    "create_us",
    "update_us",
)
VERSION_COLUMNS = ("version", "wrapped", "public_key", "create_us")
SECRET_COLUMNS = ("owner", "path", "version", "wrapped_data_key", "ciphertext", "create_us", "destroy_us")


def config_to_row(config: KeyConfig) -> tuple[str, str, int, int, bool, int, int]:
    return (
        config.name,
        config.type.value,
        config.min_decryption_version,
        config.auto_rotate_period_us,
        config.deletion_allowed,
        config.create_us,
        config.update_us,
    )


def config_from_row(row: tuple[object, ...]) -> KeyConfig:
    name, type_, min_version, period, deletion_allowed, create_us, update_us = row
    assert isinstance(name, str) and isinstance(type_, str)
    assert isinstance(min_version, int) and isinstance(period, int)
    assert isinstance(create_us, int) and isinstance(update_us, int)
    return KeyConfig(
        name=name,
        type=KeyType(type_),
        min_decryption_version=min_version,
        auto_rotate_period_us=period,
        deletion_allowed=bool(deletion_allowed),
        create_us=create_us,
        update_us=update_us,
    )


def version_from_row(row: tuple[object, ...]) -> VersionRecord:
    version, wrapped, public_key, create_us = row
    assert isinstance(version, int) and isinstance(create_us, int)
    return VersionRecord(
        version=version, wrapped=_bytes(wrapped), public_key=_bytes(public_key), create_us=create_us
    )


def secret_from_row(row: tuple[object, ...]) -> SecretRecord:
    owner, path, version, wrapped, ciphertext, create_us, destroy_us = row
    assert isinstance(owner, str) and isinstance(path, str) and isinstance(version, int)
    assert isinstance(create_us, int) and isinstance(destroy_us, int)
    return SecretRecord(
        owner=owner,
        path=path,
        version=version,
        wrapped_data_key=None if wrapped is None else _bytes(wrapped),
        ciphertext=None if ciphertext is None else _bytes(ciphertext),
        create_us=create_us,
        destroy_us=destroy_us,
    )


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"expected bytes, got {type(value).__name__}")
