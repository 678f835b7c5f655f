"""The auth service's types: users, roles, API keys, refresh tokens, revocations.

Imports nothing else of the service. Times are microseconds since the epoch (the kit's clock). Secrets never sit
here in clear: passwords as Argon2id hashes, TOTP seeds and HMAC secrets as key vault ciphertexts, refresh tokens
and recovery codes as SHA-256 digests.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ApiKey",
    "ApiKeyKind",
    "RefreshToken",
    "Revocation",
    "RevocationKind",
    "Role",
    "TokenPair",
    "User",
]


class ApiKeyKind(StrEnum):
    HMAC = "hmac"  # TG1-HMAC-SHA256, the secret shown once and kept as a key vault ciphertext
    ED25519 = "ed25519"  # TG1-ED25519, only the client's public key is kept


class RevocationKind(StrEnum):
    JTI = "jti"  # one access token
    FAMILY = "family"  # a refresh-token family and every access token issued from it
    USER = "user"  # every token of a user issued at or before the revocation
    KEY = "key"  # an API key


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str  # unique, compared case-sensitively after NFKC normalisation by the core
    account_id: str  # the trading account the user acts for
    roles: tuple[str, ...]
    password_hash: str  # Argon2id, PHC string
    create_time_us: int
    totp_seed: str | None = None  # key vault ciphertext of the confirmed seed (associated data: the user id)
    totp_pending_seed: str | None = None  # ciphertext of a seed being enrolled, until confirmed
    version: int = 1  # bumped by every update (compare-and-swap)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    permissions: frozenset[str]


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str  # tgk_…, checksummed (see services/auth/apikeys.py)
    user_id: str
    account_id: str
    kind: ApiKeyKind
    scopes: frozenset[str]
    ip_allow_list: tuple[str, ...]  # CIDRs; empty = any address
    tier: str
    create_time_us: int
    expire_time_us: int
    secret: str | None = None  # HMAC: key vault ciphertext of the secret (associated data: the key id)
    public_key: bytes | None = None  # Ed25519: the raw 32-byte public key
    previous_secret: str | None = None  # after a rotation, until previous_expire_time_us
    previous_public_key: bytes | None = None
    previous_expire_time_us: int | None = None
    revoke_time_us: int | None = None
    label: str = ""
    version: int = 1


@dataclass(frozen=True, slots=True)
class RefreshToken:
    token_hash: str  # lowercase hex SHA-256 of the opaque token (the token itself is never stored)
    family_id: str
    user_id: str
    issue_time_us: int
    expire_time_us: int
    amr: tuple[str, ...]
    cnf_thumbprint: str | None = None  # RFC 8705 x5t#S256 of the client certificate the family is bound to
    used_time_us: int | None = None  # set once: a second use is a reuse (the family is revoked)
    revoke_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    sequence: int  # increasing, gap-free per hot store: guards resume a stream from the last one they saw
    kind: RevocationKind
    value: str  # the jti, family id, user id or key id
    revoke_time_us: int  # for USER and FAMILY: tokens issued at or before this instant are revoked
    expire_time_us: int  # after this the revocation no longer matters (what it revokes has expired)


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str  # a JWT (typ at+jwt)
    access_expires_in_us: int
    refresh_token: str  # opaque; only its hash is stored
    refresh_expires_in_us: int
