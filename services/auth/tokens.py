"""Access and refresh tokens: issue, refresh with rotation and reuse detection, logout, revocation, the JWKS.

Pure core (no grpc, no database driver): the records go through `AuthStore`, revocations through `HotState`
(which wakes every guard's revocation stream), signatures through the key vault's `JwtSigner`.

Access tokens are JWTs (RFC 9068 profile, RFC 8725 practice), signed by the key vault's Ed25519 key:
    header  {"alg": "EdDSA", "typ": "at+jwt", "kid": "auth/jwt:v<n>"}
    claims  iss, aud, sub (user id), iat, nbf (= iat), exp (iat + access TTL, 5 min by default), jti, scope
            (space-separated permissions), acct (account id), amr, fam (refresh family id), and
            cnf {"x5t#S256": ...} (RFC 8705) when the family is bound to a client certificate.
The signing input is exactly RFC 7515's: BASE64URL(UTF8(header)) "." BASE64URL(payload), compact JSON.

Refresh tokens are opaque ("tgr_" + 43 base64url characters of 256 random bits); only their SHA-256 is stored.
Every use spends the token and returns a new pair of the same family (RFC 9700 rotation). A second use of a spent
token is a reuse: the whole family is revoked in the store and a FAMILY revocation is published, so the access
tokens issued from it stop working in every guard. A family bound to a certificate (its thumbprint recorded at
issue) refreshes only with that certificate; the token presented with another certificate (or none) has leaked,
so its family is revoked too.

Revocation entries expire one access-token lifetime after they are made (what they revoke has expired by then).
`jwks_json()` serves RFC 7517 / RFC 8037 OKP keys of every JWT key version that still verifies (the overlap after
a rotation), cached for `jwks_ttl_s` (default 5 s) and refreshed at once when the vault signs with a kid the
cached set lacks (so a token never names a kid the JWKS does not publish).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Protocol

import structlog

from services.auth.hot import HotState
from services.auth.model import RefreshToken, RevocationKind, TokenPair, User
from services.auth.ports import JwtSigner
from services.auth.store import AuthStore
from tradeguard.errors import Unauthenticated

__all__ = [
    "REFRESH_PREFIX",
    "LoadUser",
    "TokenService",
    "TokenSettings",
    "refresh_token_hash",
]

REFRESH_PREFIX: Final = "tgr_"
_SECOND_US: Final = 1_000_000
_SIGN_ATTEMPTS: Final = 3

Clock = Callable[[], int]
Random = Callable[[int], bytes]
LoadUser = Callable[[str], Awaitable[tuple[User, frozenset[str]] | None]]
"""user id -> (the user, their current permissions), or None when the user no longer exists."""

log = structlog.get_logger("auth.tokens")


class TokenSettings(Protocol):
    """What the token service reads of the auth service's Settings (services/auth/settings.py)."""

    @property
    def issuer(self) -> str: ...

    @property
    def audience(self) -> str: ...

    @property
    def access_ttl_s(self) -> int: ...

    @property
    def refresh_ttl_s(self) -> int: ...


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def refresh_token_hash(token: str) -> str:
    """Lowercase hex SHA-256 of the opaque token: what the store keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenService:
    """Implements `TokenIssuer` (services/auth/ports.py) and the rest of the token life cycle."""

    def __init__(  # noqa: PLR0917 - the service's dependencies, in the documented order
        self,
        store: AuthStore,
        hot: HotState,
        signer: JwtSigner,
        clock: Clock,
        random: Random,
        settings: TokenSettings,
        *,
        jwks_ttl_s: float = 5.0,
    ) -> None:
        self._store, self._hot, self._signer = store, hot, signer
        self._clock, self._random, self._settings = clock, random, settings
        self._access_ttl_us = settings.access_ttl_s * _SECOND_US
        self._refresh_ttl_us = settings.refresh_ttl_s * _SECOND_US
        self._jwks_ttl_us = round(jwks_ttl_s * _SECOND_US)
        self._jwks: tuple[int, list[tuple[str, bytes]], str] | None = None  # (fetched at, keys, JSON)
        self._jwks_lock = asyncio.Lock()

    # --- issue -----------------------------------------------------------------------------------------------

    async def issue(
        self, user: User, permissions: Iterable[str], amr: Sequence[str], cnf_thumbprint: str | None
    ) -> TokenPair:
        """A new family: an access token and its first refresh token (bound to `cnf_thumbprint` if given)."""
        family_id = b64url(self._random(16))
        return await self._mint(
            user, frozenset(permissions), tuple(amr), cnf_thumbprint, family_id, authenticated=True
        )

    async def _mint(
        self,
        user: User,
        permissions: frozenset[str],
        amr: tuple[str, ...],
        cnf_thumbprint: str | None,
        family_id: str,
        *,
        authenticated: bool = False,
    ) -> TokenPair:
        """Mint a pair; `authenticated`: the user authenticated just now (a login, not a refresh), so the access
        token carries `auth_time` (OIDC) — a refreshed token never does, so it never counts as a fresh login
        (step-up checks such as releasing a kill switch ask for one)."""
        now_us = self._clock()
        refresh = REFRESH_PREFIX + b64url(self._random(32))
        await self._store.insert_refresh_token(
            RefreshToken(
                token_hash=refresh_token_hash(refresh),
                family_id=family_id,
                user_id=user.user_id,
                issue_time_us=now_us,
                expire_time_us=now_us + self._refresh_ttl_us,
                amr=amr,
                cnf_thumbprint=cnf_thumbprint,
            )
        )
        iat = now_us // _SECOND_US
        claims: dict[str, object] = {
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "sub": user.user_id,
            "iat": iat,
            "nbf": iat,
            "exp": iat + self._settings.access_ttl_s,
            "jti": b64url(self._random(16)),
            "scope": " ".join(sorted(permissions)),
            "acct": user.account_id,
            "amr": list(amr),
            "fam": family_id,
        }
        if authenticated:
            claims["auth_time"] = iat
        if cnf_thumbprint is not None:
            claims["cnf"] = {"x5t#S256": cnf_thumbprint}
        access = await self._sign_jwt(claims)
        return TokenPair(
            access_token=access,
            access_expires_in_us=self._access_ttl_us,
            refresh_token=refresh,
            refresh_expires_in_us=self._refresh_ttl_us,
        )

    async def _sign_jwt(self, claims: dict[str, object]) -> str:
        """header.payload.signature with the header's kid the one the vault signed with: the kid is guessed from
        the JWKS's newest version and the token re-signed if the vault rotated in between."""
        payload = b64url(_compact_json(claims))
        kid = await self._newest_kid()
        for _ in range(_SIGN_ATTEMPTS):
            header = b64url(_compact_json({"alg": "EdDSA", "kid": kid, "typ": "at+jwt"}))
            signing_input = f"{header}.{payload}"
            signed_kid, signature = await self._signer.sign(signing_input.encode("ascii"))
            if signed_kid == kid:
                return f"{signing_input}.{b64url(signature)}"
            kid = signed_kid
            self._jwks = None  # a version the cached JWKS lacks: publish it before a token names it
        raise RuntimeError("the JWT key kept rotating while signing")

    async def _newest_kid(self) -> str:
        keys = await self._public_keys()
        if not keys:
            raise RuntimeError("the JWT key has no version that verifies")
        return keys[-1][0]

    # --- refresh, logout ---------------------------------------------------------------------------------------

    async def refresh(self, refresh_token: str, cnf_thumbprint: str | None, load_user: LoadUser) -> TokenPair:
        """Spend `refresh_token` and return a new pair of its family; Unauthenticated (one opaque answer) when
        it is unknown, expired, revoked, reused (the family is revoked) or presented without the certificate
        its family is bound to (the family is revoked: the token leaked)."""
        now_us = self._clock()
        record, spent = await self._store.use_refresh_token(refresh_token_hash(refresh_token), now_us)
        if record is None:
            raise Unauthenticated("refresh token unknown")
        if not spent:
            if record.revoke_time_us is not None:  # its family was revoked already (reuse, logout, by hand)
                raise Unauthenticated(f"refresh token of revoked family {record.family_id}")
            await self.revoke_family(record.family_id)
            log.warning("auth.refresh_reuse", family_id=record.family_id, user_id=record.user_id)
            raise Unauthenticated(f"refresh token reused: family {record.family_id} revoked")
        if record.expire_time_us <= now_us:
            raise Unauthenticated("refresh token expired")
        if record.cnf_thumbprint is not None and (
            cnf_thumbprint is None
            or not hmac.compare_digest(record.cnf_thumbprint.encode(), cnf_thumbprint.encode())
        ):
            await self.revoke_family(record.family_id)
            log.warning("auth.refresh_wrong_certificate", family_id=record.family_id, user_id=record.user_id)
            raise Unauthenticated(
                f"refresh token bound to another certificate: family {record.family_id} revoked"
            )
        loaded = await load_user(record.user_id)
        if loaded is None:
            await self.revoke_family(record.family_id)
            raise Unauthenticated("refresh token of a user that no longer exists")
        user, permissions = loaded
        return await self._mint(user, permissions, record.amr, record.cnf_thumbprint, record.family_id)

    async def logout(self, refresh_token: str) -> None:
        """End the session of `refresh_token`: its family revoked (refresh tokens and access tokens alike).
        An unknown token is ignored (no oracle of which tokens exist)."""
        record, _ = await self._store.use_refresh_token(refresh_token_hash(refresh_token), self._clock())
        if record is not None:
            await self.revoke_family(record.family_id)

    # --- revocation --------------------------------------------------------------------------------------------

    async def revoke_jti(self, jti: str) -> None:
        """One access token, in every guard until it would have expired."""
        now_us = self._clock()
        await self._hot.publish_revocation(RevocationKind.JTI, jti, now_us, now_us + self._access_ttl_us)

    async def revoke_family(self, family_id: str) -> None:
        """A family: its refresh tokens in the store, its access tokens issued until now in every guard."""
        now_us = self._clock()
        await self._store.revoke_family(family_id, now_us)
        await self._hot.publish_revocation(
            RevocationKind.FAMILY, family_id, now_us, now_us + self._access_ttl_us
        )

    async def revoke_user(self, user_id: str) -> None:
        """Every session of a user: their refresh tokens in the store, their access tokens issued until now in
        every guard."""
        now_us = self._clock()
        await self._store.revoke_user_families(user_id, now_us)
        await self._hot.publish_revocation(RevocationKind.USER, user_id, now_us, now_us + self._access_ttl_us)

    # --- JWKS ------------------------------------------------------------------------------------------------

    async def jwks_json(self) -> str:
        """{"keys": [...]}: an RFC 8037 OKP key (Ed25519, alg EdDSA, use sig) per JWT key version that still
        verifies, oldest first."""
        return (await self._jwks_entry())[2]

    async def _public_keys(self) -> list[tuple[str, bytes]]:
        return (await self._jwks_entry())[1]

    async def _jwks_entry(self) -> tuple[int, list[tuple[str, bytes]], str]:
        cached = self._jwks
        if cached is not None and self._clock() - cached[0] < self._jwks_ttl_us:
            return cached
        async with self._jwks_lock:  # one vault read however many callers find the cache stale
            cached = self._jwks
            if cached is not None and self._clock() - cached[0] < self._jwks_ttl_us:
                return cached
            keys = await self._signer.public_keys()
            document = {
                "keys": [
                    {
                        "kty": "OKP",
                        "crv": "Ed25519",
                        "x": b64url(public),
                        "kid": kid,
                        "alg": "EdDSA",
                        "use": "sig",
                    }
                    for kid, public in keys
                ]
            }
            entry = (self._clock(), keys, json.dumps(document, separators=(",", ":")))
            self._jwks = entry
            return entry
