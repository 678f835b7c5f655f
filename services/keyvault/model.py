"""The key vault's types: keys and their versions, seal status, data keys, secret versions.

Imports nothing else of the service: the core's modules, the stores and the servicer all build on these.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "Clock",
    "DataKey",
    "KeyConfig",
    "KeyType",
    "Random",
    "SealStatus",
    "SecretVersionInfo",
    "StoredKey",
    "VersionRecord",
]

Clock = Callable[[], int]
"""Microseconds since the epoch (injected: tests use a fake clock)."""
Random = Callable[[int], bytes]
"""n random bytes (injected)."""


class KeyType(enum.Enum):
    AES256_GCM = "aes256-gcm"
    HMAC_SHA256 = "hmac-sha256"
    ED25519 = "ed25519"


@dataclass(frozen=True)
class KeyConfig:
    name: str
    type: KeyType
    min_decryption_version: int
    auto_rotate_period_us: int  # 0: no automatic rotation
    deletion_allowed: bool
    create_us: int
    update_us: int


@dataclass(frozen=True)
class VersionRecord:
    """One version as stored: its material wrapped under the root key; the public key of an Ed25519 version."""

    version: int
    wrapped: bytes = field(repr=False)
    public_key: bytes
    create_us: int


@dataclass(frozen=True)
class StoredKey:
    config: KeyConfig
    versions: tuple[VersionRecord, ...]  # ascending by version, never empty

    @property
    def latest(self) -> VersionRecord:
        return self.versions[-1]


@dataclass(frozen=True)
class SealStatus:
    sealed: bool
    root_kind: str  # "local" or "pkcs11"


@dataclass(frozen=True)
class DataKey:
    """A data key sealed under a vault key (envelope encryption); its plaintext only when asked for."""

    plaintext: bytes | None = field(repr=False)
    wrapped: str


@dataclass(frozen=True)
class SecretVersionInfo:
    """A secret version's metadata (never its value)."""

    owner: str
    path: str
    version: int
    create_us: int
    destroy_us: int  # 0 while the version exists

    @property
    def destroyed(self) -> bool:
        return self.destroy_us != 0
