"""Access and refresh tokens against the real key vault (mTLS), real stores and hot state; JWTs checked by PyJWT
against the published JWKS (as a guard would)."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.hot import HotState
from services.auth.model import RevocationKind, User
from services.auth.ports import TokenIssuer
from services.auth.store import AuthStore
from services.auth.tokens import TokenService, refresh_token_hash
from services.auth.vault_client import VaultClient
from services.keyvault.settings import Settings as KeyVaultSettings
from tradeguard.errors import Unauthenticated
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.testing import FakeClock, RunningService

ISSUER, AUDIENCE = "tradeguard-auth", "tradeguard"
PERMISSIONS = frozenset({"orders:read", "orders:write"})
CERT_A, CERT_B = "A" * 43, "B" * 43
sqlite_only = pytest.mark.parametrize("auth_db", ["sqlite"], indirect=True)


@dataclass(frozen=True)
class TokenSettings:
    issuer: str = ISSUER
    audience: str = AUDIENCE
    access_ttl_s: int = 300
    refresh_ttl_s: int = 3600


@dataclass
class Env:
    tokens: TokenService
    store: AuthStore
    hot: HotState
    clock: FakeClock
    user: User
    users: dict[str, User]

    async def load_user(self, user_id: str) -> tuple[User, frozenset[str]] | None:
        user = self.users.get(user_id)
        return None if user is None else (user, PERMISSIONS)

    async def verified(self, token: str) -> dict[str, Any]:
        """The claims of `token`, verified as a guard would: PyJWT, EdDSA only, the key found by kid in the JWKS."""
        jwks = jwt.PyJWKSet.from_json(await self.tokens.jwks_json())
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt"
        claims: dict[str, Any] = jwt.decode(
            token,
            key=jwks[header["kid"]],
            algorithms=["EdDSA"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
        )
        return claims


@pytest.fixture
async def env(auth_store: AuthStore, hot_state: HotState, vault: VaultClient, clock: FakeClock) -> Env:
    clock.advance(int(time.time() * 1_000_000) - clock())  # PyJWT checks exp/nbf against the real time
    user = User("u1", "alice", "acct-1", ("trader",), "$argon2id$x", clock())
    tokens = TokenService(auth_store, hot_state, vault, clock, os.urandom, TokenSettings())
    issuer: TokenIssuer = tokens  # what the user core is given (checked by mypy)
    assert issuer is tokens
    return Env(tokens, auth_store, hot_state, clock, user, {"u1": user})


def _segments(token: str) -> list[dict[str, Any]]:
    header, payload, _ = token.split(".")
    return [json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in (header, payload)]


async def _revocations(hot: HotState) -> list[tuple[RevocationKind, str]]:
    return [(r.kind, r.value) for r in await hot.revocations_after(0)]


# --- issue -------------------------------------------------------------------------------------------------------


async def test_issue_makes_a_verifiable_access_token_and_an_opaque_refresh_token(env: Env) -> None:
    pair = await env.tokens.issue(env.user, PERMISSIONS, ("pwd", "otp"), None)
    header, _ = _segments(pair.access_token)
    assert header == {"alg": "EdDSA", "kid": "auth/jwt:v1", "typ": "at+jwt"}
    claims = await env.verified(pair.access_token)
    now_s = env.clock() // 1_000_000
    assert claims["sub"] == "u1" and claims["acct"] == "acct-1"
    assert claims["scope"] == "orders:read orders:write" and claims["amr"] == ["pwd", "otp"]
    assert claims["iat"] == claims["nbf"] == now_s and claims["exp"] == now_s + 300
    assert len(claims["jti"]) >= 22 and len(claims["fam"]) >= 22 and "cnf" not in claims
    assert pair.access_expires_in_us == 300_000_000 and pair.refresh_expires_in_us == 3600_000_000
    assert pair.refresh_token.startswith("tgr_") and len(pair.refresh_token) == 4 + 43
    # Only the refresh token's hash is stored.
    record, spent = await env.store.use_refresh_token(refresh_token_hash(pair.refresh_token), env.clock())
    assert record is not None and spent and record.family_id == claims["fam"] and record.amr == ("pwd", "otp")


async def test_the_signature_covers_exactly_rfc7515s_signing_input(env: Env) -> None:
    pair = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), CERT_A)
    header, payload, signature = pair.access_token.split(".")
    jwks = json.loads(await env.tokens.jwks_json())
    (key,) = jwks["keys"]
    assert key == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": key["x"],
        "kid": "auth/jwt:v1",
        "alg": "EdDSA",
        "use": "sig",
    }
    public = base64.urlsafe_b64decode(key["x"] + "=")
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    Ed25519PublicKey.from_public_bytes(public).verify(raw_signature, f"{header}.{payload}".encode("ascii"))
    assert (await env.verified(pair.access_token))["cnf"] == {"x5t#S256": CERT_A}
    # One altered payload character: the signature no longer verifies.
    claims = _segments(pair.access_token)[1]
    claims["scope"] = "withdraw"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        await env.verified(f"{header}.{forged_payload}.{signature}")


# --- refresh -----------------------------------------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_family(env: Env) -> None:
    first = await env.tokens.issue(env.user, PERMISSIONS, ("pwd", "otp"), None)
    family = (await env.verified(first.access_token))["fam"]
    second = await env.tokens.refresh(first.refresh_token, None, env.load_user)
    assert second.refresh_token != first.refresh_token
    claims = await env.verified(second.access_token)
    assert claims["fam"] == family and claims["amr"] == ["pwd", "otp"]
    third = await env.tokens.refresh(second.refresh_token, None, env.load_user)
    # The spent `first` comes back (a thief's copy, or the victim's): the whole family is revoked.
    with pytest.raises(Unauthenticated) as reused:
        await env.tokens.refresh(first.refresh_token, None, env.load_user)
    assert "reused" in reused.value.cause and reused.value.message == "authentication failed"
    with pytest.raises(Unauthenticated):
        await env.tokens.refresh(third.refresh_token, None, env.load_user)  # the live one too
    assert await _revocations(env.hot) == [(RevocationKind.FAMILY, family)]


@sqlite_only
async def test_a_certificate_bound_family_refreshes_only_with_its_certificate(env: Env) -> None:
    bound = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), CERT_A)
    renewed = await env.tokens.refresh(bound.refresh_token, CERT_A, env.load_user)
    assert (await env.verified(renewed.access_token))["cnf"] == {"x5t#S256": CERT_A}
    with pytest.raises(Unauthenticated) as other:
        await env.tokens.refresh(renewed.refresh_token, CERT_B, env.load_user)
    assert "another certificate" in other.value.cause
    family = (await env.verified(renewed.access_token))["fam"]
    assert await _revocations(env.hot) == [
        (RevocationKind.FAMILY, family)
    ]  # the token leaked: family revoked
    # Without any certificate: refused the same way.
    again = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), CERT_A)
    with pytest.raises(Unauthenticated):
        await env.tokens.refresh(again.refresh_token, None, env.load_user)


@sqlite_only
async def test_unknown_expired_and_orphaned_refresh_tokens_are_refused(env: Env) -> None:
    with pytest.raises(Unauthenticated) as unknown:
        await env.tokens.refresh("tgr_" + "x" * 43, None, env.load_user)
    assert unknown.value.cause == "refresh token unknown"
    pair = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
    env.clock.advance(3600 * 1_000_000)
    with pytest.raises(Unauthenticated) as expired:
        await env.tokens.refresh(pair.refresh_token, None, env.load_user)
    assert expired.value.cause == "refresh token expired"
    orphan = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
    del env.users["u1"]
    with pytest.raises(Unauthenticated) as gone:
        await env.tokens.refresh(orphan.refresh_token, None, env.load_user)
    assert gone.value.cause == "refresh token of a user that no longer exists"


# --- logout and revocation -----------------------------------------------------------------------------------------


@sqlite_only
async def test_logout_revokes_the_family(env: Env) -> None:
    pair = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
    await env.tokens.logout(pair.refresh_token)
    with pytest.raises(Unauthenticated):
        await env.tokens.refresh(pair.refresh_token, None, env.load_user)
    family = (await env.verified(pair.access_token))["fam"]
    assert await _revocations(env.hot) == [(RevocationKind.FAMILY, family)]
    await env.tokens.logout("tgr_unknown")  # no error, no oracle
    assert len(await _revocations(env.hot)) == 1


async def test_revocations_by_jti_family_and_user_reach_the_hot_state(env: Env) -> None:
    a = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
    b = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
    claims = await env.verified(a.access_token)
    await env.tokens.revoke_jti(claims["jti"])
    await env.tokens.revoke_family(claims["fam"])
    await env.tokens.revoke_user("u1")
    revocations = await env.hot.revocations_after(0)
    assert [(r.kind, r.value) for r in revocations] == [
        (RevocationKind.JTI, claims["jti"]),
        (RevocationKind.FAMILY, claims["fam"]),
        (RevocationKind.USER, "u1"),
    ]
    assert all(r.revoke_time_us == env.clock() for r in revocations)
    assert all(
        r.expire_time_us == env.clock() + 300_000_000 for r in revocations
    )  # one access-token lifetime
    for pair in (a, b):  # every refresh family of the user is revoked in the store
        with pytest.raises(Unauthenticated):
            await env.tokens.refresh(pair.refresh_token, None, env.load_user)


# --- the JWKS and key rotation ---------------------------------------------------------------------------------------


@sqlite_only
async def test_a_token_signed_before_a_rotation_still_verifies(
    env: Env, keyvault: RunningService[KeyVaultSettings, Any]
) -> None:
    before = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
    async with keyvault.channel("ops") as ops_channel:
        ops = keyvault_pb2_grpc.KeyVaultServiceStub(ops_channel)
        await ops.RotateKey(pb.RotateKeyRequest(name="auth/jwt"))
        # The JWKS cache still holds v1 only: the vault signs with v2, the token is re-signed naming v2, and the
        # JWKS is refreshed before the token is handed out.
        after = await env.tokens.issue(env.user, PERMISSIONS, ("pwd",), None)
        assert _segments(before.access_token)[0]["kid"] == "auth/jwt:v1"
        assert _segments(after.access_token)[0]["kid"] == "auth/jwt:v2"
        kids = [k["kid"] for k in json.loads(await env.tokens.jwks_json())["keys"]]
        assert kids == ["auth/jwt:v1", "auth/jwt:v2"]
        assert (await env.verified(before.access_token))["sub"] == "u1"  # the overlap
        assert (await env.verified(after.access_token))["sub"] == "u1"
        # Once the operator retires v1 (and the JWKS cache turns over), v1 tokens no longer verify.
        await ops.UpdateKeyConfig(pb.UpdateKeyConfigRequest(name="auth/jwt", min_decryption_version=2))
    env.clock.advance(5_000_000)
    kids = [k["kid"] for k in json.loads(await env.tokens.jwks_json())["keys"]]
    assert kids == ["auth/jwt:v2"]
    with pytest.raises(KeyError):
        await env.verified(before.access_token)


@sqlite_only
async def test_the_jwks_is_cached_briefly(env: Env, keyvault: RunningService[KeyVaultSettings, Any]) -> None:
    first = await env.tokens.jwks_json()
    async with keyvault.channel("ops") as ops_channel:
        await keyvault_pb2_grpc.KeyVaultServiceStub(ops_channel).RotateKey(
            pb.RotateKeyRequest(name="auth/jwt")
        )
    assert await env.tokens.jwks_json() == first  # within the cache's 5 s
    env.clock.advance(5_000_000)
    assert [k["kid"] for k in json.loads(await env.tokens.jwks_json())["keys"]] == [
        "auth/jwt:v1",
        "auth/jwt:v2",
    ]
