"""Access tokens verified in process: the cached JWKS and the verifier (RFC 8725, RFC 9068, RFC 8705).

`JwksCache` holds the auth service's public keys by `kid`. A `kid` it does not know triggers ONE refresh: concurrent
misses share it, and refreshes for misses start at most once per `min_refresh_interval_s` (default 1 s), so a flood
of tokens with made-up `kid`s costs at most one GetJwks per second. A refresh replaces the whole set (a key the auth
service withdrew stops verifying). Only keys whose type fits a configured algorithm are kept (OKP/Ed25519 → EdDSA,
EC/P-256 → ES256); at most 64 keys, a JWKS document of at most 64 KiB.

`JwtVerifier.verify(token, peer_thumbprint)` → `Principal`, or `Unauthenticated(cause)`:

- the algorithm comes from configuration only: the header's `alg` must be one of `algorithms` AND the algorithm
  of the key its `kid` names (so `none`, or HS256 "signed" with a public key, never verifies);
- header `typ` must be `at+jwt` (or `application/at+jwt`; PyJWT does not check it);
- `kid` is untrusted input: a string of at most 128 characters, looked up only in the cache;
- `iss`, `aud`, `sub`, `exp`, `nbf`, `iat`, `jti` and `acct` are required; `exp`/`nbf`/`iat` are checked here
  against the injected clock with `leeway_s` (default 5 s, at most 60 s); `auth_time` (OIDC: when the user logged
  in; the auth service sets it only on a token a login minted, never a refresh) is optional, a number not after
  `iat`, and becomes `Principal.auth_time_us` (step-up checks: `Principal.fresh_mfa`);
- `cnf.x5t#S256` (RFC 8705), when present, must equal (constant-time) the SHA-256 thumbprint of the client
  certificate of this connection; a bound token from another certificate, or from no certificate, is refused;
- tokens longer than 8 KiB are refused unread.

Verified tokens are cached by the SHA-256 of the token until their `exp` (bounded LRU, `cache_size` entries,
default 10,000, about 5 MB): a cached token skips the signature check, never the certificate binding, the
revocation check or the expiry; a cached token whose key has left the JWKS (withdrawn at a refresh, every 5 minutes
and on an unknown kid) is verified again, and refused. Revocations and the fail-closed rule:
`tradeguard.guard.revocations`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

import jwt as pyjwt

from tradeguard.errors import Unauthenticated
from tradeguard.guard.revocations import RevocationSet
from tradeguard.observability.logging import get_logger
from tradeguard.principal import Principal

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_CACHE_SIZE",
    "JwksCache",
    "JwksFetch",
    "JwtVerifier",
    "cert_thumbprint",
]

_log = get_logger("tradeguard.guard.jwt")

DEFAULT_ALGORITHMS: Final = ("EdDSA", "ES256")
DEFAULT_CACHE_SIZE: Final = 10_000
DEFAULT_LEEWAY_S: Final = 5.0
MAX_LEEWAY_S: Final = 60.0
MAX_TOKEN_CHARS: Final = 8192
MAX_KID_CHARS: Final = 128
MAX_JWKS_BYTES: Final = 65_536
MAX_KEYS: Final = 64
TYPES: Final = frozenset({"at+jwt", "application/at+jwt"})
REQUIRED: Final = ("iss", "aud", "sub", "exp", "nbf", "iat", "jti")
_SUPPORTED: Final = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-256"): "ES256"}

#: Returns the JWKS document (RFC 7517 JSON) from the auth service.
JwksFetch = Callable[[], Awaitable[str]]


_PEM_END: Final = "-----END CERTIFICATE-----"


def cert_thumbprint(pem: bytes | str) -> str:
    """RFC 8705 `x5t#S256`: base64url (no padding) of the SHA-256 of the certificate's DER encoding (the first
    certificate of `pem`: the leaf, when a chain follows it). ValueError when `pem` holds no certificate."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    end = text.find(_PEM_END)
    if end < 0:
        raise ValueError("no PEM certificate")
    try:
        der = ssl.PEM_cert_to_DER_cert(text[: end + len(_PEM_END)] + "\n")
    except (ValueError, binascii.Error):
        raise ValueError("malformed PEM certificate") from None
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Key:
    algorithm: str
    key: pyjwt.PyJWK


class JwksCache:
    """The auth service's token-signing public keys by `kid` (see the module for the refresh rule)."""

    def __init__(
        self,
        fetch: JwksFetch,
        *,
        algorithms: Collection[str] = DEFAULT_ALGORITHMS,
        min_refresh_interval_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = set(algorithms) - set(_SUPPORTED.values())
        if unknown or not algorithms:
            raise ValueError(f"algorithms must be a non-empty subset of {sorted(_SUPPORTED.values())}")
        self._fetch = fetch
        self.algorithms = frozenset(algorithms)
        self._interval = min_refresh_interval_s
        self._monotonic = monotonic
        self._keys: dict[str, _Key] = {}
        self._inflight: asyncio.Task[None] | None = None
        self._last_start = -math.inf
        self.refreshes = 0  # GetJwks calls made

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def has(self, kid: str) -> bool:
        """Whether `kid` is in the key set now (no refresh)."""
        return kid in self._keys

    async def get(self, kid: str) -> _Key | None:
        """The key for `kid`; an unknown one triggers a refresh (shared, rate-limited) and is looked up again."""
        key = self._keys.get(kid)
        if key is not None:
            return key
        task = self._inflight
        if task is None:
            if self._monotonic() - self._last_start < self._interval:
                return None  # refreshed less than a second ago: this kid is not there
            task = self._start()
        await asyncio.shield(task)
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Refresh now (at start-up and periodically), joining one in flight; failures are logged, keys kept."""
        task = self._inflight or self._start()
        await asyncio.shield(task)

    def _start(self) -> asyncio.Task[None]:
        self._last_start = self._monotonic()
        task = asyncio.get_running_loop().create_task(self._load(), name="jwks-refresh")
        self._inflight = task
        return task

    async def _load(self) -> None:
        try:
            self.refreshes += 1
            document = await self._fetch()
            self._keys = self.parse(document)
        except Exception as error:
            _log.warning("jwks_refresh_failed", error=type(error).__name__)
        finally:
            self._inflight = None

    def parse(self, document: str) -> dict[str, _Key]:
        """The usable keys of a JWKS document; keys of other types or algorithms are skipped."""
        if len(document) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document too large")
        data = json.loads(document)
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError("JWKS document has no key list")
        keys: dict[str, _Key] = {}
        for entry in entries[:MAX_KEYS]:
            if not isinstance(entry, dict):
                continue
            kid = entry.get("kid")
            algorithm = _SUPPORTED.get((str(entry.get("kty")), str(entry.get("crv"))))
            if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS or algorithm is None:
                continue
            if algorithm not in self.algorithms or entry.get("alg", algorithm) != algorithm:
                continue
            if entry.get("use", "sig") != "sig" or "d" in entry:  # a private key never belongs here
                continue
            try:
                keys[kid] = _Key(algorithm, pyjwt.PyJWK(entry, algorithm))
            except (pyjwt.PyJWKError, ValueError, TypeError):
                continue
        return keys


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    expires_us: int  # exp (+ leeway): the cache entry's end
    issued_at_us: int
    family: str | None
    thumbprint: str | None  # cnf.x5t#S256 when the token is certificate-bound
    kid: str  # the key that verified it: a cached token whose key was withdrawn is verified again


def _fail(cause: str) -> Unauthenticated:
    return Unauthenticated(cause)


def _numeric(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"claim {name} is not a number")
    return float(value)


def _text(claims: dict[str, Any], name: str, *, required: bool = True, limit: int = 256) -> str:
    value = claims.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise _fail(f"claim {name} is not a valid string")
    return value


class JwtVerifier:
    """Verifies access tokens in process (see the module for every rule)."""

    def __init__(
        self,
        jwks: JwksCache,
        issuer: str,
        audience: str,
        *,
        revocations: RevocationSet,
        algorithms: Collection[str] = DEFAULT_ALGORITHMS,
        leeway_s: float = DEFAULT_LEEWAY_S,
        clock_us: Callable[[], int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be in 0..{MAX_LEEWAY_S}")
        if cache_size < 0:
            raise ValueError("cache_size must be 0 or more")
        self.algorithms = frozenset(algorithms) & jwks.algorithms
        if not self.algorithms:
            raise ValueError("no algorithm both configured and supported by the JWKS cache")
        self._jwks = jwks
        self._issuer, self._audience = issuer, audience
        self._revocations = revocations
        self._leeway_us = round(leeway_s * 1_000_000)
        self._leeway_s = leeway_s
        self._clock = clock_us
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self.cache_size = cache_size
        self.signature_checks = 0  # tokens whose signature was checked (cache misses)

    async def verify(self, token: str, peer_thumbprint: Callable[[], str | None]) -> Principal:
        """The token's principal, or `Unauthenticated` with the cause (for the log, never for the caller).
        `peer_thumbprint()` gives the `x5t#S256` of this connection's client certificate (asked only for a
        certificate-bound token)."""
        if len(token) > MAX_TOKEN_CHARS:
            raise _fail("token too long")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        verified = self._cache.get(digest)
        now = self._clock()
        if verified is not None and not self._jwks.has(verified.kid):
            del self._cache[digest]  # its key was withdrawn from the JWKS: verify again (and refuse)
            verified = None
        if verified is not None:
            if now >= verified.expires_us:
                del self._cache[digest]
                raise _fail("token expired")
            self._cache.move_to_end(digest)
        else:
            verified = await self._verify(token, now)
            if self.cache_size:
                self._cache[digest] = verified
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return self._admit(verified, peer_thumbprint)

    def _admit(self, verified: _Verified, thumbprint_of_peer: Callable[[], str | None]) -> Principal:
        if verified.thumbprint is not None:
            peer_thumbprint = thumbprint_of_peer()
            if peer_thumbprint is None:
                raise _fail("certificate-bound token without a client certificate")
            if not hmac.compare_digest(verified.thumbprint.encode(), peer_thumbprint.encode()):
                raise _fail("certificate-bound token from another certificate")
        unusable = self._revocations.unusable()
        if unusable is not None:
            raise _fail(unusable)
        principal = verified.principal
        assert principal.token_id is not None
        revoked = self._revocations.token_revoked(
            principal.token_id, verified.family, principal.user_id, verified.issued_at_us
        )
        if revoked is not None:
            raise _fail(revoked)
        return principal

    async def _verify(self, token: str, now_us: int) -> _Verified:
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise _fail("token is not a JWT") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in TYPES:
            raise _fail("token typ is not at+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _fail("token alg not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS:
            raise _fail("token kid missing or malformed")
        key = await self._jwks.get(kid)
        if key is None:
            raise _fail("token kid unknown")
        if key.algorithm != alg:
            raise _fail("token alg does not match its key")
        self.signature_checks += 1
        try:
            claims = pyjwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": list(REQUIRED),
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except pyjwt.InvalidSignatureError:
            raise _fail("token signature invalid") from None
        except pyjwt.InvalidAudienceError:
            raise _fail("token aud not accepted") from None
        except pyjwt.InvalidIssuerError:
            raise _fail("token iss not accepted") from None
        except pyjwt.MissingRequiredClaimError as error:
            raise _fail(f"token lacks claim {error.claim}") from None
        except pyjwt.PyJWTError as error:
            raise _fail(f"token invalid ({type(error).__name__})") from None
        return self._claims(claims, now_us, kid)

    def _claims(self, claims: dict[str, Any], now_us: int, kid: str) -> _Verified:
        leeway = self._leeway_us
        exp_us = round(_numeric(claims, "exp") * 1_000_000)
        nbf_us = round(_numeric(claims, "nbf") * 1_000_000)
        iat_us = round(_numeric(claims, "iat") * 1_000_000)
        if now_us >= exp_us + leeway:
            raise _fail("token expired")
        if now_us + leeway < nbf_us:
            raise _fail("token not yet valid")
        if now_us + leeway < iat_us:
            raise _fail("token issued in the future")
        subject = _text(claims, "sub")
        jti = _text(claims, "jti", limit=128)
        account = _text(claims, "acct")
        scope = _text(claims, "scope", required=False, limit=4096)
        family = _text(claims, "fam", required=False, limit=128) or None
        amr = claims.get("amr", [])
        if not isinstance(amr, list) or not all(isinstance(m, str) for m in amr) or len(amr) > 16:
            raise _fail("claim amr is not a list of strings")
        auth_time_us = round(_numeric(claims, "auth_time") * 1_000_000) if "auth_time" in claims else 0
        if auth_time_us < 0 or auth_time_us > iat_us:
            raise _fail("claim auth_time after iat")
        thumbprint: str | None = None
        if "cnf" in claims:
            cnf = claims["cnf"]
            bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
            if not isinstance(bound, str) or not bound:
                raise _fail("claim cnf has no x5t#S256")
            thumbprint = bound
        principal = Principal(
            user_id=subject,
            account_id=account,
            scopes=frozenset(scope.split()),
            token_id=jti,
            amr=tuple(amr),
            auth_time_us=auth_time_us,
        )
        return _Verified(principal, exp_us + leeway, iat_us, family, thumbprint, kid)
