"""TOTP (services/auth/totp.py): the RFC 4226 and RFC 6238 test vectors, verification within ±1 step, the matched
step, malformed codes, the otpauth:// URI; and the replay rule it relies on (HotState.advance_totp_step), on the
in-process hot state and on the real Redis."""

from __future__ import annotations

import base64
import secrets
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest

from services.auth.hot import HotState
from services.auth.totp import ISSUER, SEED_BYTES, TOTP, Totp, hotp, new_seed, provisioning_uri

# RFC 4226 Appendix D: the secret "12345678901234567890" and the HOTP values of counters 0..9.
RFC4226_SECRET = b"12345678901234567890"
RFC4226_VALUES = [
    "755224",
    "287082",
    "359152",
    "969429",
    "338314",
    "254676",
    "287922",
    "162583",
    "399871",
    "520489",
]

# RFC 6238 Appendix B, with the errata's seeds: 20 bytes for SHA-1, 32 for SHA-256, 64 for SHA-512.
SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC6238_VECTORS = [
    # (Unix time, SHA-1, SHA-256, SHA-512), 8 digits, 30-second steps, T0 = 0
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
RFC6238_STEPS = {59: 0x1, 1111111109: 0x23523EC, 1111111111: 0x23523ED, 1234567890: 0x273EF07}


@pytest.mark.parametrize("counter", range(10))
def test_rfc4226_appendix_d(counter: int) -> None:
    assert hotp(RFC4226_SECRET, counter) == RFC4226_VALUES[counter]


@pytest.mark.parametrize("vector", RFC6238_VECTORS, ids=lambda v: str(v[0]))
@pytest.mark.parametrize("digest", ["sha1", "sha256", "sha512"])
def test_rfc6238_appendix_b(vector: tuple[int, str, str, str], digest: str) -> None:
    unix_s, *expected = vector
    totp = Totp(digits=8, digest=digest)
    want = dict(zip(["sha1", "sha256", "sha512"], expected, strict=True))[digest]
    now_us = unix_s * 1_000_000
    assert totp.code_at(SEEDS[digest], now_us) == want
    if unix_s in RFC6238_STEPS:
        assert totp.step_at(now_us) == RFC6238_STEPS[unix_s]
    assert totp.verify(SEEDS[digest], want, now_us) == totp.step_at(now_us)


def test_the_errata_seed_lengths_matter() -> None:
    """The RFC's original text used the 20-byte seed for SHA-256/512 too; its vectors need the longer ones."""
    assert Totp(digits=8, digest="sha256").code_at(SEEDS["sha1"], 59_000_000) != "46119246"
    assert Totp(digits=8, digest="sha512").code_at(SEEDS["sha1"], 59_000_000) != "90693936"


def test_service_defaults_are_sha1_six_digits_thirty_seconds() -> None:
    assert (TOTP.digest, TOTP.digits, TOTP.step_s, TOTP.window) == ("sha1", 6, 30, 1)
    assert TOTP.code_at(RFC4226_SECRET, 59_000_000) == "287082"  # step 1: RFC 4226's counter 1


def test_verify_accepts_one_step_either_side_and_returns_the_matched_step() -> None:
    seed = SEEDS["sha1"]
    now_us = 1_700_000_015_000_000
    current = TOTP.step_at(now_us)
    for offset in (-1, 0, 1):
        assert TOTP.verify(seed, TOTP.code(seed, current + offset), now_us) == current + offset
    for offset in (-3, -2, 2, 3):
        code = TOTP.code(seed, current + offset)
        if code not in {TOTP.code(seed, current + o) for o in (-1, 0, 1)}:
            assert TOTP.verify(seed, code, now_us) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-1],  # too short
        lambda c: c + "0",  # too long
        lambda c: f" {c}",  # a space
        lambda c: c[:3] + " " + c[3:],
        lambda c: "".join(
            chr(ord(d) - ord("0") + 0xFF10) for d in c
        ),  # fullwidth digits (NFKC would map them)
        lambda c: "".join(chr(ord(d) - ord("0") + 0x0660) for d in c),  # Arabic-Indic digits (str.isdigit)
        lambda c: "",
    ],
)
def test_verify_refuses_anything_but_exactly_the_ascii_digits(mangle: object) -> None:
    assert callable(mangle)
    seed = SEEDS["sha1"]
    now_us = 1_700_000_015_000_000
    code = TOTP.code_at(seed, now_us)
    assert TOTP.verify(seed, code, now_us) is not None
    assert TOTP.verify(seed, mangle(code), now_us) is None


def test_new_seed_is_twenty_random_bytes() -> None:
    assert len(new_seed(secrets.token_bytes)) == SEED_BYTES == 20
    with pytest.raises(ValueError, match="wrong number of bytes"):
        new_seed(lambda n: b"x" * (n - 1))


def test_provisioning_uri_round_trips_through_pyotp() -> None:
    seed = secrets.token_bytes(SEED_BYTES)
    uri = provisioning_uri(seed, "alice@example.com")
    parsed = urlparse(uri)
    assert (parsed.scheme, parsed.netloc) == ("otpauth", "totp")
    assert parsed.path == "/Tradeguard:alice%40example.com"
    query = parse_qs(parsed.query)
    assert query["issuer"] == [ISSUER] == ["Tradeguard"]
    assert base64.b32decode(query["secret"][0] + "=" * (-len(query["secret"][0]) % 8)) == seed
    assert "algorithm" not in query and "digits" not in query and "period" not in query  # the defaults
    app = pyotp.parse_uri(uri)  # what an authenticator app reads
    assert isinstance(app, pyotp.TOTP)
    now_s = 1_700_000_000
    assert app.at(now_s) == TOTP.code_at(seed, now_s * 1_000_000)


def test_uri_names_non_default_parameters_and_issuer() -> None:
    uri = Totp(digits=8, digest="sha256", step_s=60, issuer="Acme Desk").uri(SEEDS["sha256"], "bob")
    query = parse_qs(urlparse(uri).query)
    assert query["algorithm"] == ["SHA256"] and query["digits"] == ["8"] and query["period"] == ["60"]
    assert query["issuer"] == ["Acme Desk"] and urlparse(uri).path == "/Acme%20Desk:bob"


# --- each code once, never an older after a newer: the hot state's rule the caller goes through ---------------


async def test_a_matched_step_is_accepted_once_and_never_an_older_one(hot_state: HotState) -> None:
    hot = hot_state
    seed = secrets.token_bytes(SEED_BYTES)
    now_us = 1_700_000_015_000_000
    current = TOTP.step_at(now_us)
    step = TOTP.verify(seed, TOTP.code(seed, current), now_us)
    assert step == current
    assert await hot.advance_totp_step("usr_a", step, TOTP.replay_ttl_us)
    assert not await hot.advance_totp_step("usr_a", step, TOTP.replay_ttl_us)  # the same code again
    older = TOTP.verify(seed, TOTP.code(seed, current - 1), now_us)
    assert older == current - 1  # still within the window...
    assert not await hot.advance_totp_step(
        "usr_a", older, TOTP.replay_ttl_us
    )  # ...but older than the accepted one
    newer = TOTP.verify(seed, TOTP.code(seed, current + 1), now_us)
    assert newer is not None and await hot.advance_totp_step("usr_a", newer, TOTP.replay_ttl_us)
    assert await hot.advance_totp_step("usr_b", current, TOTP.replay_ttl_us)  # per user


def test_the_replay_memory_outlives_the_window() -> None:
    """A step must be remembered until no code of it can match any more: (window + 1) steps after it."""
    assert TOTP.replay_ttl_us >= (TOTP.window + 1) * TOTP.step_s * 1_000_000
