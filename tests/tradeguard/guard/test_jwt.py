"""The JWT misuse suite (RFC 8725) against the verifier, with real Ed25519 keys and a fake clock."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.tradeguard.guard.fake_auth import (
    AUDIENCE,
    ISSUER,
    TokenIssuer,
    hs256_with_public_key,
    unsigned,
    with_header,
    with_payload,
)
from tradeguard.errors import Unauthenticated
from tradeguard.guard.jwt import JwksCache, JwtVerifier, cert_thumbprint
from tradeguard.guard.revocations import Kind, RevocationSet, Revoked
from tradeguard.mesh import pki
from tradeguard.testing import FakeClock

NOW_S = 1_700_000_000


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self) -> None:
        self.issuer = TokenIssuer()
        self.clock = FakeClock(NOW_S * 1_000_000)
        self.monotonic = Monotonic()
        self.revocations = RevocationSet(self.clock)
        self.revocations.stream_up()
        self.fetches = 0

        async def fetch() -> str:
            self.fetches += 1
            await asyncio.sleep(0)
            return self.issuer.jwks()

        self.jwks = JwksCache(fetch, monotonic=self.monotonic)
        self.verifier = JwtVerifier(
            self.jwks, ISSUER, AUDIENCE, revocations=self.revocations, clock_us=self.clock, leeway_s=5.0
        )

    def token(self, **overrides: Any) -> str:
        return self.issuer.token(NOW_S, **overrides)

    async def verify(self, token: str, thumbprint: str | None = None) -> Any:
        return await self.verifier.verify(token, lambda: thumbprint)

    async def refused(self, token: str, cause: str, thumbprint: str | None = None) -> None:
        with pytest.raises(Unauthenticated) as refused:
            await self.verify(token, thumbprint)
        assert cause in refused.value.cause
        assert (
            refused.value.message == "authentication failed"
        )  # what a caller would see: nothing of the cause


@pytest.fixture
def s() -> Setup:
    return Setup()


async def test_a_good_token_gives_its_principal(s: Setup) -> None:
    principal = await s.verify(s.token(scope="orders:read withdraw", acct="acct-9", sub="usr_9"))
    assert principal.user_id == "usr_9" and principal.account_id == "acct-9"
    assert principal.scopes == frozenset({"orders:read", "withdraw"})
    assert principal.amr == ("pwd", "otp") and principal.token_id and principal.key_id is None


async def test_alg_none_is_refused(s: Setup) -> None:
    await s.refused(unsigned(s.issuer), "alg not allowed")


async def test_hs256_signed_with_the_public_key_is_refused(s: Setup) -> None:
    await s.refused(hs256_with_public_key(s.issuer), "alg not allowed")


async def test_an_alg_that_does_not_match_its_key_is_refused(s: Setup) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(
        s.issuer.claims(NOW_S), ec_key, algorithm="ES256", headers={"typ": "at+jwt", "kid": "auth/jwt:v1"}
    )
    await s.refused(token, "alg does not match its key")


async def test_expired_and_not_yet_valid_tokens_are_refused(s: Setup) -> None:
    await s.refused(s.token(exp=NOW_S - 6), "expired")
    await s.verify(s.token(exp=NOW_S - 4))  # within the 5 s leeway
    await s.refused(s.token(nbf=NOW_S + 60), "not yet valid")
    await s.refused(s.token(iat=NOW_S + 60), "issued in the future")


async def test_a_cached_token_still_expires(s: Setup) -> None:
    token = s.token(exp=NOW_S + 10)
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
        ({"cnf": {"x5t": "abc"}}, "x5t#S256"),
    ],
)
async def test_wrong_or_missing_claims_are_refused(s: Setup, overrides: dict[str, Any], cause: str) -> None:
    await s.refused(s.token(**overrides), cause)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+JWT+x", None, 1])
async def test_wrong_typ_is_refused(s: Setup, typ: object) -> None:
    jwt_typ = s.token(headers={"typ": "JWT"}) if typ == "JWT" else with_header(s.token(), typ=typ)
    await s.refused(jwt_typ, "typ is not at+jwt")


async def test_typ_application_at_jwt_is_accepted(s: Setup) -> None:
    await s.verify(s.token(headers={"typ": "application/at+jwt"}))


async def test_an_altered_payload_is_refused(s: Setup) -> None:
    token = s.token()
    await s.refused(with_payload(token, acct="acct-2"), "signature invalid")
    await s.refused(with_payload(token, scope="orders:read orders:write withdraw"), "signature invalid")


async def test_unknown_kid_refreshes_once_then_refuses(s: Setup) -> None:
    await s.verify(s.token())
    assert s.fetches == 1
    s.issuer.add_key("auth/jwt:v9")
    forged = s.issuer.token(NOW_S, kid="auth/jwt:v9")
    s.issuer.keys.pop("auth/jwt:v9")  # a kid the auth service does not publish
    s.monotonic.now += 2
    results = await asyncio.gather(*(s.verify(forged) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) and r.cause == "token kid unknown" for r in results)
    assert s.fetches == 2  # twenty misses shared one refresh
    await s.refused(forged, "kid unknown")
    assert s.fetches == 2  # within a second of the last refresh: no new one
    s.monotonic.now += 1.0
    await s.refused(forged, "kid unknown")
    assert s.fetches == 3


async def test_a_rotated_in_key_is_fetched_on_first_sight(s: Setup) -> None:
    await s.verify(s.token())
    s.issuer.add_key("auth/jwt:v2")
    s.monotonic.now += 5
    principal = await s.verify(s.issuer.token(NOW_S, kid="auth/jwt:v2"))
    assert principal.user_id == "usr_1" and s.fetches == 2
    await s.verify(s.token())  # the previous key still verifies (overlap)


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
    await s.refused(with_header(s.token(), kid=kid), cause)
    assert s.fetches == 0


async def test_an_oversized_token_is_refused_unread(s: Setup) -> None:
    await s.refused("a" * 9000, "too long")
    assert s.fetches == 0


async def test_revoked_jti_family_and_user(s: Setup) -> None:
    expire = (NOW_S + 600) * 1_000_000
    by_jti = s.token()
    jti = jwt.decode(by_jti, options={"verify_signature": False})["jti"]
    await s.verify(by_jti)  # verified and cached: the revocation must still apply
    s.revocations.apply(Revoked(1, Kind.JTI, jti, 0, expire))
    await s.refused(by_jti, "token revoked")

    s.revocations.apply(Revoked(2, Kind.FAMILY, "fam_7", NOW_S * 1_000_000, expire))
    await s.refused(s.token(fam="fam_7"), "family revoked")
    await s.verify(s.token(fam="fam_8"))

    s.revocations.apply(Revoked(3, Kind.USER, "usr_5", NOW_S * 1_000_000, expire))
    await s.refused(s.token(sub="usr_5"), "user's tokens revoked")
    later = s.issuer.token(NOW_S + 1, sub="usr_5")  # issued after the revocation: valid again
    s.clock.advance_s(1)
    await s.verify(later)
    assert s.revocations.last_sequence == 3


async def test_a_cached_token_skips_only_the_signature_check(s: Setup) -> None:
    token = s.token()
    for _ in range(5):
        await s.verify(token)
    assert s.verifier.signature_checks == 1


def _thumbprint_of(paths: pki.PkiPaths, name: str) -> str:
    return cert_thumbprint(paths.cert(name).read_bytes())


async def test_a_certificate_bound_token_from_another_certificate_is_refused(
    s: Setup, pki_paths: pki.PkiPaths
) -> None:
    mine, other = _thumbprint_of(pki_paths, "ops"), _thumbprint_of(pki_paths, "monitor")
    token = s.token(cnf={"x5t#S256": mine})
    assert (await s.verify(token, mine)).user_id == "usr_1"
    await s.refused(token, "from another certificate", other)
    await s.refused(token, "without a client certificate", None)
    unbound = s.token()
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
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(s.token(), never)
    assert refused.value.cause == "revocation stream never connected"
    fresh.stream_up()
    await verifier.verify(s.token(), never)
    fresh.stream_down()
    s.clock.advance_s(4.9)
    await verifier.verify(s.token(), never)  # an outage shorter than the bound: still served
    s.clock.advance_s(0.2)
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(s.token(), never)
    assert refused.value.cause == "revocation stream down too long"
    fresh.stream_up()
    await verifier.verify(s.token(), never)


def test_jwks_parsing_keeps_only_usable_public_keys(s: Setup) -> None:
    document = json.loads(s.issuer.jwks())
    good = document["keys"][0]
    private = dict(good, kid="with-d", d=good["x"])
    wrong_alg = dict(good, kid="alg-hs", alg="HS256")
    encrypting = dict(good, kid="enc", use="enc")
    rsa = {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"}
    keys = s.jwks.parse(json.dumps({"keys": [good, private, wrong_alg, encrypting, rsa, "junk"]}))
    assert set(keys) == {good["kid"]}
    with pytest.raises(ValueError, match="too large"):
        s.jwks.parse(" " * 70_000)


def test_configuration_cannot_allow_hmac_algorithms(s: Setup) -> None:
    async def fetch() -> str:
        return ""

    with pytest.raises(ValueError, match="algorithms"):
        JwksCache(fetch, algorithms=("HS256",))
    with pytest.raises(ValueError, match="algorithms"):
        JwksCache(fetch, algorithms=("none", "EdDSA"))


async def test_a_cached_token_of_a_withdrawn_key_is_refused(s: Setup) -> None:
    token = s.token()
    await s.verify(token)  # cached
    s.issuer.keys.pop("auth/jwt:v1")
    s.issuer.add_key("auth/jwt:v2")
    s.monotonic.now += 2
    await s.jwks.refresh()  # the periodic refresh: v1 is gone
    await s.refused(token, "kid unknown")
