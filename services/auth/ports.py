"""What the auth service's cores need from the key vault, as Protocols (the vault client implements them over
the mesh; tests run the real key vault, never a stand-in)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["JwtSigner", "Sealer"]


class Sealer(Protocol):
    """Envelope encryption by the key vault: secrets (TOTP seeds, HMAC API-key secrets) are stored only as
    ciphertexts bound to their owner by the associated data (the user id, the key id)."""

    async def seal(self, plaintext: bytes, associated_data: bytes) -> str: ...

    async def open(self, ciphertext: str, associated_data: bytes) -> bytes:
        """The plaintext; raises the kit's OpaqueError family (never the cause) when it does not open."""
        ...


class JwtSigner(Protocol):
    """Ed25519 signatures by the key vault's JWT signing key (EdDSA, RFC 8037); the private key never leaves it."""

    async def sign(self, signing_input: bytes) -> tuple[str, bytes]:
        """(kid of the key version that signed, the 64-byte signature)."""
        ...

    async def public_keys(self) -> list[tuple[str, bytes]]:
        """(kid, raw 32-byte public key) of every version that may still have signed a live token (the overlap
        that lets tokens signed before a rotation verify)."""
        ...
