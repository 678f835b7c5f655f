"""The versioned secret store: each version of a value sealed under its own random data key.

A version's associated data is `tradeguard/keyvault/secret:<owner>:<path>:v<version>`, so a value (or its data
key) copied to another owner, path or version does not open. The data key is wrapped under the root key with the
same binding. Destroying a version erases its data key and value; the metadata stays.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from services.keyvault import primitives
from services.keyvault.errors import InvalidArgument
from services.keyvault.root import RootKey, RootUnwrapError
from services.keyvault.store import SecretRecord

__all__ = ["SecretVersionInfo", "check_owner", "check_path", "data_key_ad", "open_secret", "seal_secret"]

OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
PATH_RE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,255}")
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class SecretVersionInfo:
    owner: str
    path: str
    version: int
    create_us: int
    destroy_us: int

    @property
    def destroyed(self) -> bool:
        return self.destroy_us != 0

    @classmethod
    def of(cls, record: SecretRecord) -> SecretVersionInfo:
        destroy_us = record.destroy_us if record.ciphertext is None else 0
        return cls(record.owner, record.path, record.version, record.create_us, destroy_us)


def check_owner(owner: str) -> str:
    if not OWNER_RE.fullmatch(owner):
        raise InvalidArgument.field("owner", "must be 1-128 characters of A-Z a-z 0-9 . _ @ + -")
    return owner


def check_path(path: str) -> str:
    if not PATH_RE.fullmatch(path):
        raise InvalidArgument.field("path", "must be 1-256 characters of a-z 0-9 . _ / -")
    return path


def _ad(owner: str, path: str, version: int) -> bytes:
    return f"tradeguard/keyvault/secret:{owner}:{path}:v{version}".encode()


def data_key_ad(owner: str, path: str, version: int) -> bytes:
    """What a version's data key is wrapped under the root key with: it binds the key to its secret version."""
    return _ad(owner, path, version) + b":data-key"


def seal_secret(
    root: RootKey, random: Callable[[int], bytes], *, owner: str, path: str, version: int, value: bytes
) -> tuple[bytes, bytes]:
    """(wrapped data key, nonce || ciphertext || tag) of one version."""
    ad = _ad(owner, path, version)
    data_key, nonce = random(primitives.KEY_LEN), random(primitives.NONCE_LEN)
    sealed = nonce + primitives.Aead(data_key).seal(nonce, value, ad)
    return root.wrap(data_key, data_key_ad(owner, path, version)), sealed


def open_secret(root: RootKey, record: SecretRecord) -> bytes:
    """The value of a (not destroyed) version; `RootUnwrapError` or `IntegrityError` if it was tampered with."""
    assert record.wrapped_data_key is not None and record.ciphertext is not None
    ad = _ad(record.owner, record.path, record.version)
    data_key = root.unwrap(record.wrapped_data_key, data_key_ad(record.owner, record.path, record.version))
    nonce, sealed = record.ciphertext[: primitives.NONCE_LEN], record.ciphertext[primitives.NONCE_LEN :]
    try:
        return primitives.Aead(data_key).open(nonce, sealed, ad)
    except primitives.IntegrityError:
        raise RootUnwrapError("secret value does not authenticate") from None
