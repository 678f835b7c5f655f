"""The secret store: versioned values, each version sealed under its own random data key.

A version's associated data is `tradeguard/keyvault/secret:<owner>:<path>:v<version>`, so a value (or its data
key) copied to another owner, path or version does not open. The data key is wrapped under the root key with the
same binding. Destroying a version erases its data key and value; the metadata stays.

`SecretStore` runs the operations (put with optional compare-and-swap on the version, get, list, destroy): each
checks the arguments' syntax, then the caller's permission on `secret/<path>` (before existence), then that the
vault is unsealed, and is logged without the value (`Access`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from services.keyvault import primitives
from services.keyvault.access import Access
from services.keyvault.errors import (
    FailedPrecondition,
    InvalidArgument,
    cas_mismatch,
    secret_not_found,
    secret_version_destroyed,
)
from services.keyvault.keyring import segments_violation
from services.keyvault.model import Clock, Random, SecretVersionInfo
from services.keyvault.policy import Operation
from services.keyvault.root import RootKey, RootUnwrapError
from services.keyvault.sealing import Sealing
from services.keyvault.store import SecretRecord, VaultStore

__all__ = [
    "MAX_SECRET_BYTES",
    "SecretStore",
    "check_owner",
    "check_path",
    "data_key_ad",
    "open_secret",
    "seal_secret",
    "version_info",
]

OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
PATH_RE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,255}")
MAX_SECRET_BYTES = 64 * 1024
_PUT_ATTEMPTS = 8


def version_info(record: SecretRecord) -> SecretVersionInfo:
    """A stored version's metadata (a destroyed version's destroy time; 0 while it exists)."""
    destroy_us = record.destroy_us if record.ciphertext is None else 0
    return SecretVersionInfo(record.owner, record.path, record.version, record.create_us, destroy_us)


def check_owner(owner: str) -> str:
    if not OWNER_RE.fullmatch(owner):
        raise InvalidArgument.field("owner", "must be 1-128 characters of A-Z a-z 0-9 . _ @ + -")
    return owner


def check_path(path: str) -> str:
    if not PATH_RE.fullmatch(path):
        raise InvalidArgument.field("path", "must be 1-256 characters of a-z 0-9 . _ / -")
    problem = segments_violation(path)
    if problem is not None:
        raise InvalidArgument.field("path", problem)
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


class SecretStore:
    def __init__(
        self, store: VaultStore, access: Access, sealing: Sealing, *, clock: Clock, random: Random
    ) -> None:
        self._store = store
        self._access = access
        self._sealing = sealing
        self._clock = clock
        self._random = random

    async def put_secret(
        self, caller: str | None, owner: str, path: str, value: bytes, *, cas_version: int | None = None
    ) -> SecretVersionInfo:
        """A new version; with `cas_version`, only if the newest version is that one (0: none yet)."""
        check_owner(owner)
        check_path(path)
        if len(value) > MAX_SECRET_BYTES:
            raise InvalidArgument.field("value", f"must be at most {MAX_SECRET_BYTES} bytes")
        if cas_version is not None and cas_version < 0:
            raise InvalidArgument.field("cas_version", "must not be negative")
        self._access.authorize(caller, Operation.PUT_SECRET, "secret/" + path)
        return await self._access.logged(
            "put_secret", caller, f"secret/{path}", self._put_secret(owner, path, value, cas_version)
        )

    async def _put_secret(
        self, owner: str, path: str, value: bytes, cas_version: int | None
    ) -> SecretVersionInfo:
        root = self._sealing.require()
        for _ in range(_PUT_ATTEMPTS):
            latest = await self._store.get_secret_version(owner, path, None)
            current = 0 if latest is None else latest.version
            if cas_version is not None and cas_version != current:
                raise cas_mismatch(owner, path, cas_version, current)
            version = current + 1
            wrapped, sealed = seal_secret(
                root, self._random, owner=owner, path=path, version=version, value=value
            )
            record = SecretRecord(owner, path, version, wrapped, sealed, self._clock())
            if await self._sealing.fenced(self._store.insert_secret_version(record)):
                return version_info(record)
        raise FailedPrecondition("the secret is being written concurrently; retry", reason="SECRET_CONFLICT")

    async def get_secret(
        self, caller: str | None, owner: str, path: str, version: int = 0
    ) -> tuple[bytes, SecretVersionInfo]:
        """The value of a version (0: the newest)."""
        check_owner(owner)
        check_path(path)
        if version < 0:
            raise InvalidArgument.field("version", "must not be negative")
        self._access.authorize(caller, Operation.GET_SECRET, "secret/" + path)
        return await self._access.logged(
            "get_secret", caller, f"secret/{path}", self._get_secret(owner, path, version)
        )

    async def _get_secret(self, owner: str, path: str, version: int) -> tuple[bytes, SecretVersionInfo]:
        root = self._sealing.require()
        record = await self._store.get_secret_version(owner, path, version or None)
        if record is None:
            raise secret_not_found(owner, path)
        if record.destroyed:
            raise secret_version_destroyed(owner, path, record.version)
        try:
            return open_secret(root, record), version_info(record)
        except RootUnwrapError:
            await self._sealing.refuse_if_ring_moved()
            raise

    async def list_secret_versions(
        self, caller: str | None, owner: str, path: str
    ) -> list[SecretVersionInfo]:
        check_owner(owner)
        check_path(path)
        self._access.authorize(caller, Operation.LIST_SECRET_VERSIONS, "secret/" + path)
        return await self._access.logged(
            "list_secret_versions", caller, f"secret/{path}", self._list_secret(owner, path)
        )

    async def _list_secret(self, owner: str, path: str) -> list[SecretVersionInfo]:
        self._sealing.require()
        records = await self._store.list_secret_versions(owner, path)
        if not records:
            raise secret_not_found(owner, path)
        return [version_info(r) for r in records]

    async def destroy_secret_version(self, caller: str | None, owner: str, path: str, version: int) -> None:
        check_owner(owner)
        check_path(path)
        if version < 1:
            raise InvalidArgument.field("version", "must be at least 1")
        self._access.authorize(caller, Operation.DESTROY_SECRET_VERSION, "secret/" + path)
        await self._access.logged(
            "destroy_secret_version", caller, f"secret/{path}", self._destroy_secret(owner, path, version)
        )

    async def _destroy_secret(self, owner: str, path: str, version: int) -> None:
        self._sealing.require()
        if not await self._store.destroy_secret_version(owner, path, version, self._clock()):
            raise secret_not_found(owner, path)
