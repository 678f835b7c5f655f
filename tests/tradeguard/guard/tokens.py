"""Crafted access tokens for the guard's misuse tests: the attack input, made in the test with real crypto.

- `RealKeySigner`: signs chosen claims and headers with the auth service's own JWT key in the real key vault (as
  workload `auth`, the only workload the vault lets sign with it): tokens whose signature the real auth
  service's JWKS verifies but that it would never issue (expired, wrong iss/aud/typ, a claim missing, dated in
  the past). Tokens the auth service does issue are got by logging in (tests/support.py `log_in`).
- `own_key_token`: signed with an Ed25519 key of the test's own, which the real JWKS does not publish.
- `hs256_with_public_key`, `unsigned`, `with_payload`, `with_header`: the classic forgeries of RFC 8725.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth.vault_client import VaultClient

ISSUER = "tradeguard-auth"  # the auth service's defaults (services/auth/settings.py)
AUDIENCE = "tradeguard"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """An access token's claims as the auth service writes them, at `now`; an override of None removes a claim."""
    now = time.time() if now is None else now
    fields: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "usr_1",
        "acct": "acct-1",
        "scope": "orders:read orders:write",
        "amr": ["pwd", "otp"],
        "fam": "fam_1",
        "jti": uuid.uuid4().hex,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 300,
    }
    for name, value in overrides.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return fields


class RealKeySigner:
    """Tokens signed by the real key vault with the auth service's JWT key (its newest version)."""

    def __init__(self, vault: VaultClient) -> None:
        self.vault = vault

    async def kid(self) -> str:
        """The kid of the newest version of the auth service's JWT key (the one the vault signs with)."""
        keys = await self.vault.public_keys()
        return max(keys, key=lambda entry: int(entry[0].rsplit(":v", 1)[1]))[0]

    async def token(
        self, now: float | None = None, *, headers: dict[str, Any] | None = None, **overrides: Any
    ) -> str:
        kid = await self.kid()
        header: dict[str, Any] = {"alg": "EdDSA", "typ": "at+jwt", "kid": kid}
        header.update(headers or {})
        signing_input = f"{b64url(_json(header))}.{b64url(_json(claims(now, **overrides)))}"
        signed_kid, signature = await self.vault.sign(signing_input.encode())
        assert signed_kid == kid, f"the vault signed with {signed_kid}, the header says {kid}"
        return f"{signing_input}.{b64url(signature)}"


def own_key_token(key: Ed25519PrivateKey, kid: str, now: float | None = None, **overrides: Any) -> str:
    """A token signed with `key`, a key of the test's own (not the auth service's), under `kid`."""
    return jwt.encode(claims(now, **overrides), key, algorithm="EdDSA", headers={"typ": "at+jwt", "kid": kid})


def hs256_with_public_key(jwks_json: str, kid: str) -> str:
    """The classic confusion attack: HS256 "signed" with the published public key (its JWK) as the HMAC secret."""
    entry = next(k for k in json.loads(jwks_json)["keys"] if k["kid"] == kid)
    public = json.dumps(entry)
    header = b64url(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    payload = b64url(json.dumps(claims()).encode())
    signature = hmac.new(public.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def unsigned(kid: str) -> str:
    """alg: none, no signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "at+jwt", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims()).encode())}."


def with_payload(token: str, **changes: Any) -> str:
    """The token with claims changed in its payload and its original signature kept."""
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields.update(changes)
    return f"{header}.{b64url(json.dumps(fields).encode())}.{signature}"


def with_header(token: str, **changes: Any) -> str:
    """The token with header fields changed (None: removed) and its original signature kept."""
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    for name, value in changes.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return f"{b64url(json.dumps(fields).encode())}.{payload}.{signature}"
