"""What the auth service's cores need from the key vault, as Protocols (the vault client implements them over
the mesh; tests run the real key vault, never a stand-in)."""

from __future__ import annotations

from typing import Protocol

from services.auth.model import TokenPair, User

__all__ = ["JwtSigner", "Sealer", "TokenIssuer"]


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


class TokenIssuer(Protocol):
    """Issues and revokes a user's tokens (services/auth/tokens.py): what the user core needs once a user has
    authenticated, or when their roles change."""

    async def issue(
        self, user: User, permissions: frozenset[str], amr: tuple[str, ...], cnf_thumbprint: str | None
    ) -> TokenPair:
        """A new access token (scope = `permissions`, `amr` as given, bound to the client certificate whose RFC 8705
        x5t#S256 is `cnf_thumbprint` when set) and a refresh token of a new family."""
        ...

    async def revoke_user(self, user_id: str) -> None:
        """Revoke every token of the user issued so far (access tokens and refresh families)."""
        ...
