"""Use of keys: encrypt, decrypt (one or a batch), rewrap, generate data keys, sign, verify, HMAC.

Every operation checks the arguments' syntax, then the caller's permission on `key/<name>` (before existence),
then uses the key as the key cache has it (see `key_cache` for freshness). A ciphertext or signature of a version
newer than the cached key (another replica rotated meanwhile) reloads the key once. Every failure to decrypt is
the one opaque `DecryptionFailed`. Encryptions are counted (`usage`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from services.keyvault.access import Access
from services.keyvault.errors import DecryptionFailed, DomainError, InvalidArgument
from services.keyvault.key_cache import KeyCache
from services.keyvault.keyring import LoadedKey, check_key_name, parse_token
from services.keyvault.model import DataKey, KeyType, Random
from services.keyvault.policy import Operation
from services.keyvault.usage import UsageCounter

__all__ = ["DATA_KEY_LEN", "MAX_BATCH", "MAX_PLAINTEXT_BYTES", "NONCE_LEN", "KeyUse", "check_size"]

T = TypeVar("T")

NONCE_LEN = 12
DATA_KEY_LEN = 32
MAX_PLAINTEXT_BYTES = 1024 * 1024
MAX_BATCH = 1000


def check_size(field_name: str, value: bytes, limit: int = MAX_PLAINTEXT_BYTES) -> None:
    if len(value) > limit:
        raise InvalidArgument.field(field_name, f"must be at most {limit} bytes")


class KeyUse:
    def __init__(self, access: Access, cache: KeyCache, usage: UsageCounter, *, random: Random) -> None:
        self._access = access
        self._cache = cache
        self._usage = usage
        self._random = random

    async def encrypt(
        self, caller: str | None, name: str, plaintext: bytes, associated_data: bytes = b""
    ) -> str:
        check_key_name(name)
        check_size("plaintext", plaintext)
        self._access.authorize(caller, Operation.ENCRYPT, "key/" + name)
        try:
            key = await self._cache.get(name)
            ciphertext = key.encrypt(plaintext, associated_data, self._random(NONCE_LEN))
        except DomainError as error:
            self._access.record("encrypt", caller, resource=name, outcome=error.reason)
            raise
        self._access.record("encrypt", caller, resource=name, version=key.latest_version, outcome="ok")
        await self._usage.count(key, 1)
        return ciphertext

    async def decrypt(
        self, caller: str | None, name: str, ciphertext: str, associated_data: bytes = b""
    ) -> bytes:
        check_key_name(name)
        self._access.authorize(caller, Operation.DECRYPT, "key/" + name)
        return await self._access.logged(
            "decrypt", caller, name, self._decrypt(name, ciphertext, associated_data)
        )

    async def _decrypt(self, name: str, ciphertext: str, associated_data: bytes) -> bytes:
        return (await self._open(await self._cache.get(name), ciphertext, associated_data))[0]

    async def _open(self, key: LoadedKey, ciphertext: str, associated_data: bytes) -> tuple[bytes, LoadedKey]:
        """(plaintext, the key that opened it) with a current `key`."""
        try:
            return key.decrypt(ciphertext, associated_data)[0], key
        except DecryptionFailed:
            # A version newer than ours: another replica rotated since the freshness check. Reload once.
            token = parse_token(ciphertext)
            if token is None or token.name != key.name or token.version <= key.latest_version:
                raise
        key = await self._cache.get(key.name, reload=True)
        return key.decrypt(ciphertext, associated_data)[0], key

    async def batch_encrypt(
        self, caller: str | None, name: str, items: Sequence[tuple[bytes, bytes]]
    ) -> list[str | DomainError]:
        """Each (plaintext, associated data) sealed under the latest version; a failed item fails alone."""
        check_key_name(name)
        if len(items) > MAX_BATCH:
            raise InvalidArgument.field("items", f"at most {MAX_BATCH} items")
        self._access.authorize(caller, Operation.ENCRYPT, "key/" + name)
        key = await self._access.logged("batch_encrypt", caller, name, self._cache.get(name))
        results: list[str | DomainError] = []
        for plaintext, associated_data in items:
            try:
                check_size("plaintext", plaintext)
                results.append(key.encrypt(plaintext, associated_data, self._random(NONCE_LEN)))
            except DomainError as error:
                results.append(error)
        await self._usage.count(key, sum(isinstance(r, str) for r in results))
        return results

    async def batch_decrypt(
        self, caller: str | None, name: str, items: Sequence[tuple[str, bytes]]
    ) -> list[bytes | DomainError]:
        """Each (ciphertext, associated data) opened; a failed item is its own opaque `DecryptionFailed`."""
        check_key_name(name)
        if len(items) > MAX_BATCH:
            raise InvalidArgument.field("items", f"at most {MAX_BATCH} items")
        self._access.authorize(caller, Operation.DECRYPT, "key/" + name)
        key = await self._access.logged("batch_decrypt", caller, name, self._cache.get(name))
        results: list[bytes | DomainError] = []
        for ciphertext, associated_data in items:
            try:
                plaintext, key = await self._open(key, ciphertext, associated_data)
                results.append(plaintext)
            except DecryptionFailed as error:
                self._access.log.warning(
                    "keyvault.batch_decrypt.item", caller=caller, resource=name, cause=error.cause
                )
                results.append(error)
        return results

    async def rewrap(
        self, caller: str | None, name: str, ciphertext: str, associated_data: bytes = b""
    ) -> str:
        """The same plaintext sealed under the latest version; the plaintext never leaves the vault."""
        check_key_name(name)
        self._access.authorize(caller, Operation.REWRAP, "key/" + name)
        return await self._access.logged(
            "rewrap", caller, name, self._rewrap(name, ciphertext, associated_data)
        )

    async def _rewrap(self, name: str, ciphertext: str, associated_data: bytes) -> str:
        plaintext, key = await self._open(await self._cache.get(name), ciphertext, associated_data)
        rewrapped = key.encrypt(plaintext, associated_data, self._random(NONCE_LEN))
        await self._usage.count(key, 1)
        return rewrapped

    async def generate_data_key(
        self, caller: str | None, name: str, associated_data: bytes = b"", *, include_plaintext: bool = True
    ) -> DataKey:
        """A random AES-256 data key sealed under `name` (envelope encryption); the plaintext only if asked."""
        check_key_name(name)
        self._access.authorize(caller, Operation.GENERATE_DATA_KEY, "key/" + name)
        return await self._access.logged(
            "generate_data_key",
            caller,
            name,
            self._generate_data_key(name, associated_data, include_plaintext),
        )

    async def _generate_data_key(self, name: str, associated_data: bytes, include_plaintext: bool) -> DataKey:
        key = await self._cache.get(name)
        data_key = self._random(DATA_KEY_LEN)
        wrapped = key.encrypt(data_key, associated_data, self._random(NONCE_LEN))
        await self._usage.count(key, 1)
        return DataKey(plaintext=data_key if include_plaintext else None, wrapped=wrapped)

    async def sign(self, caller: str | None, name: str, message: bytes) -> str:
        check_key_name(name)
        check_size("message", message)
        self._access.authorize(caller, Operation.SIGN, "key/" + name)
        return await self._access.logged("sign", caller, name, self._use(name, lambda key: key.sign(message)))

    async def verify(self, caller: str | None, name: str, message: bytes, signature: str) -> bool:
        """Check an Ed25519 signature (VERIFY right) or an HMAC (only with the HMAC right on that key: checking
        guesses of MAC'd data is as good as computing the MAC)."""
        check_key_name(name)
        resource = "key/" + name
        if not self._access.allows(caller, Operation.HMAC, resource):
            self._access.authorize(caller, Operation.VERIFY, resource)
        return await self._access.logged(
            "verify", caller, name, self._verify(caller, name, message, signature)
        )

    async def _verify(self, caller: str | None, name: str, message: bytes, signature: str) -> bool:
        key = await self._cache.get(name)
        if key.config.type is KeyType.HMAC_SHA256:
            self._access.authorize(caller, Operation.HMAC, "key/" + name)
        elif key.config.type is KeyType.ED25519:
            self._access.authorize(caller, Operation.VERIFY, "key/" + name)
        if key.verify(message, signature):
            return True
        token = parse_token(signature)
        if token is not None and token.name == name and token.version > key.latest_version:
            return (await self._cache.get(name, reload=True)).verify(message, signature)
        return False

    async def hmac(self, caller: str | None, name: str, data: bytes) -> str:
        check_key_name(name)
        check_size("data", data)
        self._access.authorize(caller, Operation.HMAC, "key/" + name)
        return await self._access.logged("hmac", caller, name, self._use(name, lambda key: key.hmac(data)))

    async def _use(self, name: str, operation: Callable[[LoadedKey], T]) -> T:
        return operation(await self._cache.get(name))
