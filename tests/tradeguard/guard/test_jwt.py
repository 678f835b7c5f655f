"""The JWT misuse suite (RFC 8725) against the verifier, over the real auth service's JWKS and revocation stream.

Valid tokens come from real logins (tests/support.py `log_in`); the attack input the auth service would never
issue (alg none, HS256 with the public key, wrong typ/iss/aud, expired, altered, unknown kid, ...) is crafted here
with real crypto (tests/tradeguard/guard/tokens.py): signed with the auth service's real key in the real key vault,
or with a key of the test's own that the real JWKS does not publish. The verifier's clock is a `FakeClock` set at
the real time (real tokens are valid on it) and moved by hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support import AUTH_PASSWORD, AuthServices, create_auth_user, log_in
from tests.tradeguard.guard.tokens import (
    AUDIENCE,
    ISSUER,
    RealKeySigner,
    claims,
    hs256_with_public_key,
    own_key_token,
    unsigned,
    with_header,
    with_payload,
)
from tradeguard.auth.v1 import auth_pb2 as auth_pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.errors import Unauthenticated
from tradeguard.guard.auth_client import AuthClient
from tradeguard.guard.jwt import JwksCache, JwtVerifier, cert_thumbprint
from tradeguard.guard.revocations import RevocationSet, RevocationWatcher
from tradeguard.keyvault.v1 import keyvault_pb2 as vault_pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.testing import FakeClock, eventually

OPS = "<the ops certificate>"  # a sentinel: the certificate real logins (as ops) bind their tokens to


def _claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def _kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Setup:
    """A verifier whose JWKS is fetched from the real auth service (GetJwks, as the guard workload `echo`) and
    whose revocation set is fed by the real revocation stream; tokens logged in for real or crafted."""

    def __init__(self, auth: AuthServices, signer: RealKeySigner, client: AuthClient) -> None:
        self.auth = auth
        self.signer = signer
        self.now_s = int(time.time())
        self.clock = FakeClock(self.now_s * 1_000_000)
        self.monotonic = Monotonic()
        self.revocations = RevocationSet(self.clock)
        self.watcher = RevocationWatcher(self.revocations, client)
        self.fetches = 0
        self.client = client
        self.ops = cert_thumbprint(auth.paths.cert("ops").read_bytes())

        async def fetch() -> str:
            self.fetches += 1
            return await client.jwks()

        self.jwks = JwksCache(fetch, monotonic=self.monotonic)
        self.verifier = JwtVerifier(
            self.jwks, ISSUER, AUDIENCE, revocations=self.revocations, clock_us=self.clock, leeway_s=5.0
        )

    async def user(self, roles: tuple[str, ...] = ("trader",)) -> auth_pb.User:
        return await create_auth_user(self.auth, None, roles)

    async def login(self, roles: tuple[str, ...] = ("trader",)) -> str:
        """The access token of a new user of `roles`, logged in for real (as `ops`: bound to its certificate)."""
        return await log_in(self.auth, await self.user(roles), "ops")

    async def token(self, now: float | None = None, **overrides: Any) -> str:
        """A crafted token, signed with the auth service's real key, at `now` (default: the clock's time)."""
        return await self.signer.token(self.now_s if now is None else now, **overrides)

    async def verify(self, token: str, thumbprint: str | None = OPS) -> Any:
        """`token` verified as presented by `thumbprint`'s certificate (default: ops's, which logs in)."""
        presented = self.ops if thumbprint is OPS else thumbprint
        return await self.verifier.verify(token, lambda: presented)

    async def refused(self, token: str, cause: str, thumbprint: str | None = OPS) -> None:
        with pytest.raises(Unauthenticated) as refused:
            await self.verify(token, thumbprint)
        assert cause in refused.value.cause
        assert (
            refused.value.message == "authentication failed"
        )  # what a caller would see: nothing of the cause

    async def revoke(self, **target: str) -> None:
        async with self.auth.channel("ops") as channel:
            await auth_pb2_grpc.AuthServiceStub(channel).RevokeTokens(
                auth_pb.RevokeTokensRequest(**target), timeout=10
            )


@pytest.fixture
async def s(auth: AuthServices, signer: RealKeySigner) -> AsyncIterator[Setup]:
    async with auth.channel("echo") as channel:
        setup = Setup(auth, signer, AuthClient(channel))
        watching = asyncio.create_task(setup.watcher.run())
        try:
            await eventually(lambda: setup.revocations.is_up, 10)
            yield setup
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)


async def _rotate_jwt_key(auth: AuthServices, retire_previous: bool = False) -> int:
    """RotateKey on the auth service's JWT key as `ops` (and, with `retire_previous`, every older version
    retired: min_decryption_version raised to the new one); the new version."""
    async with auth.vault_channel("ops") as channel:
        vault = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
        rotated = await vault.RotateKey(vault_pb.RotateKeyRequest(name="auth/jwt"), timeout=10)
        version = int(rotated.key.latest_version)
        if retire_previous:
            await vault.UpdateKeyConfig(
                vault_pb.UpdateKeyConfigRequest(name="auth/jwt", min_decryption_version=version), timeout=10
            )
    return version


async def test_a_good_token_gives_its_principal(s: Setup) -> None:
    user = await s.user(("trader",))
    principal = await s.verify(await log_in(s.auth, user, "ops"))
    assert principal.user_id == user.user_id and principal.account_id == user.account_id
    assert principal.scopes == frozenset({"orders:read", "orders:write"})
    assert principal.amr == ("pwd", "otp") and principal.token_id and principal.key_id is None
    # minted by a login: it carries auth_time, so a step-up check counts it as a fresh second factor
    assert abs(principal.auth_time_us - s.clock()) <= 60_000_000
    assert principal.fresh_mfa(principal.auth_time_us + 1, 300_000_000)
    assert not principal.fresh_mfa(principal.auth_time_us + 300_000_001, 300_000_000)


async def test_a_refreshed_token_is_never_a_fresh_login(s: Setup) -> None:
    user = await s.user(("viewer",))  # no second factor due: Login answers tokens at once
    async with s.auth.channel("ops") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        login = await stub.Login(
            auth_pb.LoginRequest(username=user.username, password=AUTH_PASSWORD), timeout=10
        )
        refreshed = await stub.RefreshToken(
            auth_pb.RefreshTokenRequest(refresh_token=login.tokens.refresh_token), timeout=10
        )
    assert (await s.verify(login.tokens.access_token)).auth_time_us > 0
    principal = await s.verify(refreshed.tokens.access_token)
    assert principal.auth_time_us == 0 and "auth_time" not in _claims_of(refreshed.tokens.access_token)
    crafted = await s.token(amr=["pwd", "otp"])  # a second factor, but no auth_time: not a fresh login
    assert not (await s.verify(crafted)).fresh_mfa(s.clock(), 300_000_000)


async def test_alg_none_is_refused(s: Setup) -> None:
    await s.refused(unsigned(await s.signer.kid()), "alg not allowed")


async def test_hs256_signed_with_the_public_key_is_refused(s: Setup) -> None:
    kid = await s.signer.kid()
    await s.refused(hs256_with_public_key(await s.client.jwks(), kid), "alg not allowed")


async def test_an_alg_that_does_not_match_its_key_is_refused(s: Setup) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    headers = {"typ": "at+jwt", "kid": await s.signer.kid()}  # the real Ed25519 key's kid
    token = jwt.encode(claims(s.now_s), ec_key, algorithm="ES256", headers=headers)
    await s.refused(token, "alg does not match its key")


async def test_expired_and_not_yet_valid_tokens_are_refused(s: Setup) -> None:
    now = s.now_s
    await s.refused(await s.token(exp=now - 6), "expired")
    await s.verify(await s.token(exp=now - 4))  # within the 5 s leeway
    await s.refused(await s.token(nbf=now + 60), "not yet valid")
    await s.refused(await s.token(iat=now + 60), "issued in the future")


async def test_a_cached_token_still_expires(s: Setup) -> None:
    token = await s.token(exp=s.now_s + 10)
    await s.verify(token)
    s.clock.advance_s(16)
    await s.refused(token, "expired")


@pytest.mark.parametrize(
    ("overrides", "cause"),
    [
        ({"aud": "another-api"}, "aud not accepted"),
        ({"iss": "https://evil.example"}, "iss not accepted"),
        ({"exp": None}, "lacks claim exp"),
        ({"nbf": None}, "lacks claim nbf"),
        ({"iat": None}, "lacks claim iat"),
        ({"jti": None}, "lacks claim jti"),
        ({"sub": None}, "lacks claim sub"),
        ({"aud": None}, "lacks claim aud"),
        ({"acct": None}, "claim acct"),
        ({"exp": "tomorrow"}, "not a number"),
        ({"amr": "pwd"}, "claim amr"),
        ({"auth_time": "yesterday"}, "claim auth_time is not a number"),
        ({"auth_time": 10**12}, "claim auth_time after iat"),
        ({"cnf": {"x5t": "abc"}}, "x5t#S256"),
    ],
)
async def test_wrong_or_missing_claims_are_refused(s: Setup, overrides: dict[str, Any], cause: str) -> None:
    await s.refused(await s.token(**overrides), cause)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+JWT+x", None, 1])
async def test_wrong_typ_is_refused(s: Setup, typ: object) -> None:
    if typ == "JWT":
        jwt_typ = await s.token(headers={"typ": "JWT"})
    else:
        jwt_typ = with_header(await s.login(("viewer",)), typ=typ)
    await s.refused(jwt_typ, "typ is not at+jwt")


async def test_typ_application_at_jwt_is_accepted(s: Setup) -> None:
    await s.verify(await s.token(headers={"typ": "application/at+jwt"}))


async def test_an_altered_payload_is_refused(s: Setup) -> None:
    token = await s.login(("viewer",))
    await s.refused(with_payload(token, acct="acct-2"), "signature invalid")
    await s.refused(with_payload(token, scope="orders:read orders:write withdraw"), "signature invalid")


async def test_unknown_kid_refreshes_once_then_refuses(s: Setup) -> None:
    await s.verify(await s.login(("viewer",)))
    assert s.fetches == 1
    # a kid the auth service does not publish, signed with a key of the test's own
    forged = own_key_token(Ed25519PrivateKey.generate(), "auth/jwt:v9999", s.now_s)
    s.monotonic.now += 2
    results = await asyncio.gather(*(s.verify(forged) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) and r.cause == "token kid unknown" for r in results)
    assert s.fetches == 2  # twenty misses shared one refresh
    await s.refused(forged, "kid unknown")
    assert s.fetches == 2  # within a second of the last refresh: no new one
    s.monotonic.now += 1.0
    await s.refused(forged, "kid unknown")
    assert s.fetches == 3


async def test_a_token_signed_by_another_key_under_a_published_kid_is_refused(s: Setup) -> None:
    kid = await s.signer.kid()
    await s.refused(own_key_token(Ed25519PrivateKey.generate(), kid, s.now_s), "signature invalid")


async def test_a_rotated_in_key_is_fetched_on_first_sight(s: Setup) -> None:
    before = await s.login(("viewer",))
    await s.verify(before)
    version = await _rotate_jwt_key(s.auth)
    s.monotonic.now += 5
    user = await s.user(("viewer",))
    rotated = await log_in(s.auth, user, "ops")  # the auth service signs with the new version
    assert _kid_of(rotated) == f"auth/jwt:v{version}" != _kid_of(before)
    principal = await s.verify(rotated)
    assert principal.user_id == user.user_id and s.fetches == 2
    await s.verify(before)  # the previous key still verifies (overlap)


@pytest.mark.parametrize(
    ("kid", "cause"),
    [
        ("x" * 129, "kid missing or malformed"),
        ("", "kid missing or malformed"),
        (None, "kid missing"),
        (7, "not a JWT"),
    ],
)
async def test_a_malformed_kid_is_refused_without_a_lookup(s: Setup, kid: object, cause: str) -> None:
    await s.refused(with_header(await s.login(("viewer",)), kid=kid), cause)
    assert s.fetches == 0


async def test_an_oversized_token_is_refused_unread(s: Setup) -> None:
    await s.refused("a" * 9000, "too long")
    assert s.fetches == 0


async def test_revoked_jti_family_and_user(s: Setup) -> None:
    """Revoked at the real auth service (RevokeTokens as `ops`), learnt from its revocation stream."""
    by_jti = await s.login(("viewer",))
    jti = _claims_of(by_jti)["jti"]
    await s.verify(by_jti)  # verified and cached: the revocation must still apply
    await s.revoke(jti=jti)
    await eventually(lambda: s.revocations.token_revoked(jti, None, "u", 0) is not None, 5)
    first = s.revocations.last_sequence
    await s.refused(by_jti, "token revoked")

    in_family = await s.login(("viewer",))
    other_family = await s.login(("viewer",))
    family = _claims_of(in_family)["fam"]
    assert family != _claims_of(other_family)["fam"]
    await s.revoke(family_id=family)
    await eventually(lambda: s.revocations.last_sequence == first + 1, 5)
    await s.refused(in_family, "family revoked")
    await s.verify(other_family)

    user = await s.user(("viewer",))
    before = await log_in(s.auth, user, "ops")
    await s.revoke(user_id=user.user_id)
    await eventually(lambda: s.revocations.last_sequence == first + 2, 5)
    await s.refused(before, "user's tokens revoked")
    # issued after the revocation, on the auth service's (real) clock, however long the test took to get here:
    # valid again once the verifier's clock has reached its issue time
    later_s = int(time.time()) + 1
    later = await s.token(later_s, sub=user.user_id)
    s.clock.advance(later_s * 1_000_000 - s.clock())
    await s.verify(later)
    assert s.revocations.last_sequence == first + 2


async def test_a_cached_token_skips_only_the_signature_check(s: Setup) -> None:
    token = await s.login(("viewer",))
    for _ in range(5):
        await s.verify(token)
    assert s.verifier.signature_checks == 1


def _thumbprint_of(paths: pki.PkiPaths, name: str) -> str:
    return cert_thumbprint(paths.cert(name).read_bytes())


async def test_a_certificate_bound_token_from_another_certificate_is_refused(
    s: Setup, pki_paths: pki.PkiPaths
) -> None:
    mine, other = _thumbprint_of(pki_paths, "ops"), _thumbprint_of(pki_paths, "monitor")
    user = await s.user(("viewer",))
    token = await log_in(s.auth, user, "ops")  # bound to the ops certificate that logged in
    assert _claims_of(token)["cnf"] == {"x5t#S256": mine}
    assert (await s.verify(token, mine)).user_id == user.user_id
    await s.refused(token, "from another certificate", other)
    await s.refused(token, "without a client certificate", None)
    unbound = await s.token()  # no cnf: as issued to a client that presented no certificate
    await s.verify(unbound, other)


def test_the_thumbprint_is_rfc_8705s(pki_paths: pki.PkiPaths) -> None:
    import ssl

    pem = pki_paths.cert("ops").read_text()  # the leaf, then its chain: the leaf is what is bound
    der = ssl.PEM_cert_to_DER_cert(pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert cert_thumbprint(pem) == expected and "=" not in expected and len(expected) == 43


async def test_no_token_is_trusted_before_the_revocation_stream_was_ever_up(s: Setup) -> None:
    fresh = RevocationSet(s.clock, max_outage_s=5.0)
    verifier = JwtVerifier(s.jwks, ISSUER, AUDIENCE, revocations=fresh, clock_us=s.clock)
    never: Callable[[], str | None] = lambda: None  # noqa: E731
    token = await s.token()  # unbound (no certificate to present here)
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token, never)
    assert refused.value.cause == "revocation stream never connected"
    fresh.stream_up()
    await verifier.verify(token, never)
    fresh.stream_down()
    s.clock.advance_s(4.9)
    await verifier.verify(token, never)  # an outage shorter than the bound: still served
    s.clock.advance_s(0.2)
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token, never)
    assert refused.value.cause == "revocation stream down too long"
    fresh.stream_up()
    await verifier.verify(token, never)


async def test_jwks_parsing_keeps_only_usable_public_keys(s: Setup) -> None:
    document = json.loads(await s.client.jwks())
    good = document["keys"][-1]
    private = dict(good, kid="with-d", d=good["x"])
    wrong_alg = dict(good, kid="alg-hs", alg="HS256")
    encrypting = dict(good, kid="enc", use="enc")
    rsa = {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"}
    keys = s.jwks.parse(json.dumps({"keys": [good, private, wrong_alg, encrypting, rsa, "junk"]}))
    assert set(keys) == {good["kid"]}
    with pytest.raises(ValueError, match="too large"):
        s.jwks.parse(" " * 70_000)


def test_configuration_cannot_allow_hmac_algorithms() -> None:
    async def fetch() -> str:
        return ""

    with pytest.raises(ValueError, match="algorithms"):
        JwksCache(fetch, algorithms=("HS256",))
    with pytest.raises(ValueError, match="algorithms"):
        JwksCache(fetch, algorithms=("none", "EdDSA"))


async def test_a_cached_token_of_a_withdrawn_key_is_refused(s: Setup) -> None:
    token = await s.login(("viewer",))
    await s.verify(token)  # cached
    withdrawn = _kid_of(token)
    await _rotate_jwt_key(s.auth, retire_previous=True)  # every older version retired at the vault
    await s.login(("viewer",))  # the auth service signs with the new version: its JWKS is read again
    assert withdrawn not in {k["kid"] for k in json.loads(await s.client.jwks())["keys"]}
    s.monotonic.now += 2
    await s.jwks.refresh()  # the periodic refresh: the withdrawn key is gone
    await s.refused(token, "kid unknown")
