"""The auth service's client of the key vault: `Sealer` and `JwtSigner` (services/auth/ports.py) over the mesh.

`VaultClient(channel)` calls the key vault as workload `auth` on a `MeshChannel`:
- `seal` / `open`: AES-256-GCM by the vault's "credentials" key (Encrypt / Decrypt), bound to their owner by the
  associated data (a TOTP seed to its user id, an HMAC secret to its key id);
- `sign`: Ed25519 by the vault's "auth/jwt" key (Sign, through the kit's `VaultSigner`,
  tradeguard.keyvault.signer). The vault answers a self-describing "tgv1:auth/jwt:v<n>:<base64url(signature)>";
  the kid is "auth/jwt:v<n>";
- `public_keys`: the versions of "auth/jwt" that still verify (GetKey, through the same `VaultSigner`; versions
  below the key's minimum decryption version are retired and left out), as (kid, raw 32-byte key).

HMAC secrets of API keys are opened on every signed request, so `open_secret(key_id, ciphertext)` keeps the
plaintexts in a bounded cache: at most `secret_cache_size` entries (default 10,000; the least recently used is
evicted first), each for at most `secret_cache_ttl_s` (default 60 s) after it was opened. An entry is keyed by the
key id AND the ciphertext, so a rotated secret (another ciphertext) is never answered from the cache, on any
replica; `forget(key_id)` drops a rotated or revoked key's entries at once. TOTP seeds are never cached.

Errors: the vault unreachable, sealed or out of time is `Unavailable` (reason KEY_VAULT_UNAVAILABLE, retryable);
anything else (a ciphertext that does not open, a missing key, a refused permission, a malformed answer) is the
opaque `KeyVaultError` (INTERNAL): its cause, for the log, names the operation, the status code and the vault's
reason — never a plaintext, a ciphertext, associated data or a signature.

`ensure_keys(ops_channel)` creates both keys as `ops` when missing (ALREADY_EXISTS is success): `tradeguard up`
and the tests run it before the auth service starts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import grpc

from tradeguard.keyvault.signer import (
    ED25519_PUBLIC_KEY_LEN,
    ED25519_SIGNATURE_LEN,
    KeyVaultError,
    VaultSigner,
    ensure_key,
    mapped,
    parse_signature,
)
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc

__all__ = [
    "CREDENTIALS_KEY",
    "DEFAULT_SECRET_CACHE_SIZE",
    "DEFAULT_SECRET_CACHE_TTL_S",
    "ED25519_PUBLIC_KEY_LEN",
    "ED25519_SIGNATURE_LEN",
    "JWT_KEY",
    "KeyVaultError",
    "VaultClient",
    "ensure_keys",
    "parse_signature",
]

CREDENTIALS_KEY: Final = "credentials"
JWT_KEY: Final = "auth/jwt"
DEFAULT_TIMEOUT_S: Final = 5.0
DEFAULT_SECRET_CACHE_SIZE: Final = 10_000
DEFAULT_SECRET_CACHE_TTL_S: Final = 60.0


def kid_of(key_name: str, version: int) -> str:
    return f"{key_name}:v{version}"


class _SecretCache:
    """Bounded LRU with a time to live: (key id, ciphertext) -> plaintext secret."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        if size < 0 or ttl_s < 0:
            raise ValueError("cache size and time to live must not be negative")
        self.size, self.ttl_s, self._clock = size, ttl_s, clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._by_key: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key_id: str, ciphertext: str) -> str | None:
        entry = self._entries.get((key_id, ciphertext))
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            self._drop((key_id, ciphertext))
            return None
        self._entries.move_to_end((key_id, ciphertext))
        return entry[1]

    def put(self, key_id: str, ciphertext: str, secret: str) -> None:
        if self.size == 0 or self.ttl_s == 0:
            return
        self._entries[(key_id, ciphertext)] = (self._clock() + self.ttl_s, secret)
        self._entries.move_to_end((key_id, ciphertext))
        self._by_key.setdefault(key_id, set()).add(ciphertext)
        while len(self._entries) > self.size:
            self._drop(next(iter(self._entries)))

    def forget(self, key_id: str) -> None:
        for ciphertext in self._by_key.pop(key_id, set()):
            self._entries.pop((key_id, ciphertext), None)

    def _drop(self, entry: tuple[str, str]) -> None:
        self._entries.pop(entry, None)
        ciphertexts = self._by_key.get(entry[0])
        if ciphertexts is not None:
            ciphertexts.discard(entry[1])
            if not ciphertexts:
                del self._by_key[entry[0]]


class VaultClient:
    """`Sealer` + `JwtSigner` (services/auth/ports.py) on the key vault, as workload `auth`."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        credentials_key: str = CREDENTIALS_KEY,
        jwt_key: str = JWT_KEY,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        secret_cache_size: int = DEFAULT_SECRET_CACHE_SIZE,
        secret_cache_ttl_s: float = DEFAULT_SECRET_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
        self.credentials_key, self.jwt_key, self._timeout_s = credentials_key, jwt_key, timeout_s
        self._signer = VaultSigner(channel, jwt_key, timeout_s=timeout_s)
        self._secrets = _SecretCache(secret_cache_size, secret_cache_ttl_s, clock)

    # --- Sealer ----------------------------------------------------------------------------------------------

    async def seal(self, plaintext: bytes, associated_data: bytes) -> str:
        request = pb.EncryptRequest(
            key_name=self.credentials_key, plaintext=plaintext, associated_data=associated_data
        )
        try:
            response = await self._stub.Encrypt(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise mapped("encrypt", error) from None
        return response.ciphertext

    async def open(self, ciphertext: str, associated_data: bytes) -> bytes:
        request = pb.DecryptRequest(
            key_name=self.credentials_key, ciphertext=ciphertext, associated_data=associated_data
        )
        try:
            response = await self._stub.Decrypt(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise mapped("decrypt", error) from None
        return response.plaintext

    # --- HMAC secrets of API keys, cached --------------------------------------------------------------------

    async def open_secret(self, key_id: str, ciphertext: str) -> str:
        """The HMAC secret of API key `key_id` sealed as `ciphertext` (associated data: the key id), from the
        cache when it was opened within the time to live. KeyVaultError when it does not open as UTF-8 text."""
        cached = self._secrets.get(key_id, ciphertext)
        if cached is not None:
            return cached
        raw = await self.open(ciphertext, key_id.encode("utf-8"))
        try:
            secret = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyVaultError("key vault decrypt: an API key secret is not text") from None
        self._secrets.put(key_id, ciphertext, secret)
        return secret

    def forget(self, key_id: str) -> None:
        """Drop the cached secrets of a rotated or revoked key."""
        self._secrets.forget(key_id)

    @property
    def cached_secrets(self) -> int:
        return len(self._secrets)

    # --- JwtSigner -------------------------------------------------------------------------------------------

    async def sign(self, signing_input: bytes) -> tuple[str, bytes]:
        version, signature = await self._signer.sign(signing_input)
        return kid_of(self.jwt_key, version), signature

    async def public_keys(self) -> list[tuple[str, bytes]]:
        return [(kid_of(self.jwt_key, version), key) for version, key in await self._signer.public_keys()]


async def ensure_keys(
    ops_channel: grpc.aio.Channel,
    *,
    credentials_key: str = CREDENTIALS_KEY,
    jwt_key: str = JWT_KEY,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Create the auth service's keys (as workload `ops`, the only one allowed to) if they do not exist; a key
    that exists with another type is refused (KeyVaultError), never used."""
    for name, key_type in ((credentials_key, pb.KEY_TYPE_AES256_GCM), (jwt_key, pb.KEY_TYPE_ED25519)):
        await ensure_key(ops_channel, name, key_type, timeout_s=timeout_s)
