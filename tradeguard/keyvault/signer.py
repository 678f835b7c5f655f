"""Ed25519 signing by a key the key vault holds, for any service of the mesh (the auth service's JWTs, the audit
service's checkpoints): the private key never leaves the vault.

`VaultSigner(channel, key_name)` calls the key vault on `channel` (a `MeshChannel` as the calling workload; the
vault's policy must let that workload Sign with the key and read its metadata):
- `sign(message)` → (version, 64 signature bytes), by the vault's Sign RPC. The vault answers a self-describing
  "tgv1:<key_name>:v<version>:<base64url(signature)>", parsed strictly (`parse_signature`): another key's name,
  a version 0 or with a leading zero, a non-canonical or padded encoding or a length other than 64 is refused.
- `public_keys()` → [(version, raw 32-byte key)] of the versions that still verify (GetKey; versions below the
  key's minimum decryption version are retired and left out), oldest first. A key that is not Ed25519 is refused.

`ensure_key(ops_channel, name, key_type)` creates a key as `ops` (the only workload allowed to) when it is missing
(ALREADY_EXISTS is success); a key that exists with another type is refused, never used. `tradeguard up` and the
tests run it before a service that needs the key starts.

Errors: the vault unreachable, sealed or out of time is `Unavailable` (reason KEY_VAULT_UNAVAILABLE, retryable);
anything else (a missing key, a refused permission, a malformed answer) is the opaque `KeyVaultError` (INTERNAL),
whose cause, for the log only, names the operation, the status code and the vault's reason — never a message or
a signature.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

import grpc

from tradeguard.errors import Code, OpaqueError, Unavailable
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.rpc.status import rich_status

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ED25519_PUBLIC_KEY_LEN",
    "ED25519_SIGNATURE_LEN",
    "KeyVaultError",
    "VaultSigner",
    "ensure_key",
    "mapped",
    "parse_signature",
]

DEFAULT_TIMEOUT_S: Final = 5.0
ED25519_SIGNATURE_LEN: Final = 64
ED25519_PUBLIC_KEY_LEN: Final = 32

_TOKEN: Final = re.compile(r"tgv1:([a-z0-9][a-z0-9._/-]{0,127}):v([1-9][0-9]{0,9}):([A-Za-z0-9_-]+)")
_RETRYABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


class KeyVaultError(OpaqueError):
    """The key vault refused or failed an operation; the caller sees only "internal error"."""

    code = Code.INTERNAL
    reason = "INTERNAL"
    public_message = "internal error"


def _unavailable() -> Unavailable:
    return Unavailable("the key vault is unavailable", reason="KEY_VAULT_UNAVAILABLE")


def mapped(operation: str, error: grpc.aio.AioRpcError) -> Exception:
    """The kit's error for a failed vault call: code and reason only (the vault's message is not repeated)."""
    if error.code() in _RETRYABLE:
        return _unavailable()
    reason = rich_status(error).reason or "no reason"
    return KeyVaultError(f"key vault {operation}: {error.code().name} {reason}")


def _b64url_decode(text: str) -> bytes | None:
    """Strict unpadded base64url (the vault's encoding); None when it is not."""
    if len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") == text else None


def parse_signature(key_name: str, token: str) -> tuple[int, bytes]:
    """(version, 64 signature bytes) of a vault signature "tgv1:<key_name>:v<n>:<base64url>"; KeyVaultError
    when it is anything else (another key, a bad encoding, a wrong length)."""
    match = _TOKEN.fullmatch(token)
    if match is None or match.group(1) != key_name:
        raise KeyVaultError("key vault sign: malformed signature")
    signature = _b64url_decode(match.group(3))
    if signature is None or len(signature) != ED25519_SIGNATURE_LEN:
        raise KeyVaultError("key vault sign: malformed signature")
    return int(match.group(2)), signature


class VaultSigner:
    """Ed25519 signatures by the vault's key `key_name`, and its public keys (see the module)."""

    def __init__(
        self, channel: grpc.aio.Channel, key_name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._stub = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
        self.key_name = key_name
        self._timeout_s = timeout_s

    async def sign(self, message: bytes) -> tuple[int, bytes]:
        """(the version that signed, the 64-byte signature) of `message`."""
        try:
            response = await self._stub.Sign(
                pb.SignRequest(key_name=self.key_name, message=message), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise mapped("sign", error) from None
        return parse_signature(self.key_name, response.signature)

    async def public_keys(self) -> list[tuple[int, bytes]]:
        """(version, raw 32-byte public key) of every version that still verifies, oldest first."""
        try:
            response = await self._stub.GetKey(pb.GetKeyRequest(name=self.key_name), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise mapped("get key", error) from None
        key = response.key
        if key.type != pb.KEY_TYPE_ED25519:
            raise KeyVaultError(f"key vault get key: {self.key_name} is not an Ed25519 key")
        return sorted(
            (v.version, bytes(v.public_key))
            for v in key.versions
            if v.version >= key.min_decryption_version and len(v.public_key) == ED25519_PUBLIC_KEY_LEN
        )


async def ensure_key(
    ops_channel: grpc.aio.Channel,
    name: str,
    key_type: pb.KeyType.ValueType,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> bool:
    """Create key `name` of `key_type` (on a channel of workload `ops`) unless it exists; True when created now.
    A key that exists with another type is refused (KeyVaultError), never used."""
    stub = keyvault_pb2_grpc.KeyVaultServiceStub(ops_channel)
    try:
        await stub.CreateKey(pb.CreateKeyRequest(name=name, type=key_type), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise mapped("create key", error) from None
    else:
        return True
    try:
        existing = await stub.GetKey(pb.GetKeyRequest(name=name), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        raise mapped("get key", error) from None
    if existing.key.type != key_type:
        raise KeyVaultError(f"key vault: key {name} exists with another type")
    return False
