"""The signed-request wire format (tradeguard.signing): known answers, RFC 8032, strict parsers, canonicalisation."""

from __future__ import annotations

import hashlib
import hmac
import os
import string
import zlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given
from hypothesis import strategies as st

from tradeguard import signing
from tradeguard.signing import MalformedRequest, Scheme, Window

KEY_ID = "tgk_" + "A" * 32
KEY_ID = KEY_ID + signing._checksum(KEY_ID)
SECRET = "tgs_" + "b" * 43
NONCE = "nonce-0123456789_abc"
PATH = "/tradeguard.trading.v1.TradingService/PlaceOrder"

# RFC 8032 section 7.1, TEST 1 (the empty message).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)

field_text = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=["Cs"]), max_size=40)


# --- known answers ---------------------------------------------------------------------------------------------


def test_empty_body_digest_is_the_sha256_of_nothing() -> None:
    assert signing.body_digest(b"") == signing.EMPTY_BODY_SHA256
    assert signing.EMPTY_BODY_SHA256.startswith("e3b0c442") and signing.EMPTY_BODY_SHA256.endswith("b855")
    assert signing.body_digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_canonical_string_is_six_lines_without_trailing_newline() -> None:
    text = signing.canonical_string(Scheme.HMAC_SHA256, KEY_ID, 1700000000123, NONCE, PATH, "ab" * 32)
    assert text == (f"TG1-HMAC-SHA256\n{KEY_ID}\n1700000000123\n{NONCE}\n{PATH}\n" + "ab" * 32).encode()
    assert not text.endswith(b"\n")
    assert signing.canonical_string("TG1-ED25519", KEY_ID, "5", NONCE, "/", "0" * 64).startswith(
        b"TG1-ED25519\n"
    )


def test_hmac_known_answer_computed_by_hand() -> None:
    body = b'{"symbol":"BTC-USD","quantity":"1"}'
    timestamp = 1_700_000_000_123
    by_hand_message = "\n".join(
        ["TG1-HMAC-SHA256", KEY_ID, str(timestamp), NONCE, PATH, hashlib.sha256(body).hexdigest()]
    ).encode()
    by_hand = hmac.new(SECRET.encode("utf-8"), by_hand_message, hashlib.sha256).hexdigest()
    ours = signing.sign_hmac(SECRET, KEY_ID, timestamp, NONCE, PATH, signing.body_digest(body))
    assert ours == by_hand and ours == ours.lower() and len(ours) == 64
    assert signing.verify_hmac(
        SECRET, by_hand, KEY_ID, str(timestamp), NONCE, PATH, signing.body_digest(body)
    )


def test_hmac_rejects_every_alteration() -> None:
    digest = signing.body_digest(b"body")
    good = signing.sign_hmac(SECRET, KEY_ID, 10, NONCE, PATH, digest)
    assert signing.verify_hmac(SECRET, good, KEY_ID, 10, NONCE, PATH, digest)
    altered_body = signing.body_digest(b"bodz")  # one byte changed: another digest, another signed string
    assert altered_body != digest
    assert not signing.verify_hmac(SECRET, good, KEY_ID, 10, NONCE, PATH, altered_body)
    assert not signing.verify_hmac(SECRET, good, KEY_ID, 11, NONCE, PATH, digest)
    assert not signing.verify_hmac(SECRET, good, KEY_ID, 10, NONCE + "x", PATH, digest)
    assert not signing.verify_hmac(SECRET, good, KEY_ID, 10, NONCE, PATH + "x", digest)
    assert not signing.verify_hmac(SECRET[:-1] + "c", good, KEY_ID, 10, NONCE, PATH, digest)
    assert not signing.verify_hmac(SECRET, good.upper(), KEY_ID, 10, NONCE, PATH, digest)
    assert not signing.verify_hmac(SECRET, good[:-1], KEY_ID, 10, NONCE, PATH, digest)
    assert not signing.verify_hmac(SECRET, "é" * 64, KEY_ID, 10, NONCE, PATH, digest)


def test_ed25519_rfc8032_vector_1() -> None:
    assert signing.ed25519_public_key(RFC8032_SEED) == RFC8032_PUBLIC
    # The primitive: RFC 8032's signature of the empty message by the same key.
    assert Ed25519PrivateKey.from_private_bytes(RFC8032_SEED).sign(b"") == RFC8032_SIGNATURE
    # Our signature is that key's deterministic signature of the signed string.
    digest = signing.body_digest(b"")
    ours = signing.sign_ed25519(RFC8032_SEED, KEY_ID, 42, NONCE, PATH, digest)
    message = signing.canonical_string(Scheme.ED25519, KEY_ID, 42, NONCE, PATH, digest)
    assert ours == Ed25519PrivateKey.from_private_bytes(RFC8032_SEED).sign(message).hex()
    assert len(ours) == 128 and ours == ours.lower()
    assert signing.verify_ed25519(RFC8032_PUBLIC, ours, KEY_ID, "42", NONCE, PATH, digest)


def test_ed25519_rejects_alterations_and_garbage() -> None:
    digest = signing.body_digest(b"x")
    good = signing.sign_ed25519(RFC8032_SEED, KEY_ID, 42, NONCE, PATH, digest)
    other = Ed25519PrivateKey.generate()
    assert not signing.verify_ed25519(
        RFC8032_PUBLIC, good, KEY_ID, 42, NONCE, PATH, signing.body_digest(b"y")
    )
    assert not signing.verify_ed25519(
        signing.ed25519_public_key(other), good, KEY_ID, 42, NONCE, PATH, digest
    )
    assert not signing.verify_ed25519(RFC8032_PUBLIC, good.upper(), KEY_ID, 42, NONCE, PATH, digest)
    assert not signing.verify_ed25519(RFC8032_PUBLIC, good[:64], KEY_ID, 42, NONCE, PATH, digest)
    assert not signing.verify_ed25519(RFC8032_PUBLIC[:31], good, KEY_ID, 42, NONCE, PATH, digest)
    assert not signing.verify_ed25519(RFC8032_PUBLIC, good, KEY_ID, 42, NONCE, "a\nb", digest)
    flipped = good[:10] + ("0" if good[10] != "0" else "1") + good[11:]
    assert not signing.verify_ed25519(RFC8032_PUBLIC, flipped, KEY_ID, 42, NONCE, PATH, digest)


def test_check_ed25519_public_key() -> None:
    assert signing.check_ed25519_public_key(RFC8032_PUBLIC) == RFC8032_PUBLIC
    with pytest.raises(MalformedRequest) as short:
        signing.check_ed25519_public_key(b"\x01" * 31)
    assert short.value.field == "public_key"


def test_signed_headers_are_what_a_client_sends() -> None:
    body = b"\x0a\x03abc"
    headers = dict(signing.signed_headers(Scheme.HMAC_SHA256, SECRET, KEY_ID, 1234, NONCE, PATH, body))
    assert set(headers) == {"x-tg-key", "x-tg-timestamp", "x-tg-nonce", "x-tg-signature"}
    assert headers["x-tg-timestamp"] == "1234"
    assert signing.verify_hmac(
        SECRET,
        headers["x-tg-signature"],
        KEY_ID,
        headers["x-tg-timestamp"],
        NONCE,
        PATH,
        signing.body_digest(body),
    )
    ed = dict(signing.signed_headers("TG1-ED25519", RFC8032_SEED, KEY_ID, 1234, NONCE, PATH, body))
    assert signing.verify_ed25519(
        RFC8032_PUBLIC, ed["x-tg-signature"], KEY_ID, "1234", NONCE, PATH, signing.body_digest(body)
    )
    with pytest.raises(TypeError):
        signing.signed_headers(Scheme.HMAC_SHA256, RFC8032_SEED, KEY_ID, 1, NONCE, PATH, body)
    with pytest.raises(TypeError):
        signing.signed_headers(Scheme.ED25519, SECRET, KEY_ID, 1, NONCE, PATH, body)


def test_signed_request_repr_hides_the_signature() -> None:
    request = signing.SignedRequest(KEY_ID, "1", NONCE, "f" * 64, PATH, "0" * 64, "127.0.0.1", "orders:write")
    assert "f" * 64 not in repr(request) and NONCE not in repr(request) and KEY_ID in repr(request)


# --- canonicalisation ------------------------------------------------------------------------------------------


@given(
    st.sampled_from(list(Scheme)),
    field_text,
    st.one_of(st.integers(min_value=0, max_value=10**16), field_text),
    field_text,
    field_text,
    field_text,
)
def test_canonical_string_splits_back_into_its_fields(
    scheme: Scheme, key_id: str, timestamp: int | str, nonce: str, path: str, digest: str
) -> None:
    text = signing.canonical_string(scheme, key_id, timestamp, nonce, path, digest).decode("utf-8")
    assert text.split("\n") == [scheme.value, key_id, str(timestamp), nonce, path, digest]


@given(
    st.tuples(field_text, field_text, field_text, field_text, field_text),
    st.tuples(field_text, field_text, field_text, field_text, field_text),
)
def test_distinct_requests_have_distinct_signed_strings(
    a: tuple[str, str, str, str, str], b: tuple[str, str, str, str, str]
) -> None:
    assume(a != b)
    assert signing.canonical_string(Scheme.HMAC_SHA256, *a) != signing.canonical_string(
        Scheme.HMAC_SHA256, *b
    )
    assert signing.canonical_string(Scheme.HMAC_SHA256, *a) != signing.canonical_string(Scheme.ED25519, *a)


@given(st.integers(min_value=0, max_value=4), field_text, field_text, st.sampled_from(["\n", "\r"]))
def test_a_line_break_in_any_field_is_refused(index: int, before: str, after: str, brk: str) -> None:
    fields = ["k", "1", "n", "/p", "d"]
    fields[index] = before + brk + after
    with pytest.raises(MalformedRequest):
        signing.canonical_string(Scheme.HMAC_SHA256, *fields)


def test_unknown_scheme_and_negative_timestamp_are_refused() -> None:
    with pytest.raises(MalformedRequest):
        signing.canonical_string("TG1-HMAC-SHA1", KEY_ID, 1, NONCE, PATH, "0" * 64)
    with pytest.raises(MalformedRequest):
        signing.canonical_string(Scheme.HMAC_SHA256, KEY_ID, -1, NONCE, PATH, "0" * 64)


# --- strict parsers --------------------------------------------------------------------------------------------

ascii_and_more = st.text(
    st.one_of(st.sampled_from(string.printable), st.characters(blacklist_categories=["Cs"])), max_size=80
)


@given(st.integers(min_value=1, max_value=10**16 - 1))
def test_timestamp_round_trips(value: int) -> None:
    assert signing.parse_timestamp(str(value)) == value


@given(ascii_and_more)
def test_timestamp_accepts_exactly_plain_decimal(text: str) -> None:
    plain = 1 <= len(text) <= 16 and all(c in "0123456789" for c in text) and text[0] != "0"
    if plain:
        assert signing.parse_timestamp(text) == int(text)
    else:
        with pytest.raises(MalformedRequest) as info:
            signing.parse_timestamp(text)
        assert info.value.field == "x-tg-timestamp"


@pytest.mark.parametrize(
    "text", ["", "0", "01", "+1", "-1", " 1", "1 ", "1\n", "1.0", "1e3", "١٢٣", "1_000", "0x10"]
)
def test_timestamp_refusals(text: str) -> None:
    with pytest.raises(MalformedRequest):
        signing.parse_timestamp(text)


NONCE_ALPHABET = frozenset(string.ascii_letters + string.digits + "_-")


@given(st.one_of(st.text(st.sampled_from(sorted(NONCE_ALPHABET)), min_size=10, max_size=70), ascii_and_more))
def test_nonce_accepts_exactly_its_alphabet_and_length(text: str) -> None:
    valid = 16 <= len(text) <= 64 and set(text) <= NONCE_ALPHABET
    if valid:
        assert signing.parse_nonce(text) == text
    else:
        with pytest.raises(MalformedRequest):
            signing.parse_nonce(text)


@pytest.mark.parametrize(
    "text", ["a" * 15, "a" * 65, "a" * 15 + "=", "a" * 15 + " ", "a" * 16 + "\n", "ä" * 16]
)
def test_nonce_refusals(text: str) -> None:
    with pytest.raises(MalformedRequest):
        signing.parse_nonce(text)


@given(
    st.sampled_from(list(Scheme)), st.one_of(st.text("0123456789abcdefABCDEF", max_size=130), ascii_and_more)
)
def test_signature_is_lowercase_hex_of_the_schemes_length(scheme: Scheme, text: str) -> None:
    valid = len(text) == scheme.signature_hex_len and set(text) <= set("0123456789abcdef")
    if valid:
        assert signing.parse_signature(text, scheme) == text
    else:
        with pytest.raises(MalformedRequest):
            signing.parse_signature(text, scheme)


@given(st.text("0123456789abcdef", min_size=64, max_size=64))
def test_body_digest_parser(text: str) -> None:
    assert signing.parse_body_digest(text) == text
    with pytest.raises(MalformedRequest):
        signing.parse_body_digest(text.upper() if text != text.upper() else text + "0")


# --- key ids and secrets ---------------------------------------------------------------------------------------


def _random_from(data: bytes) -> signing.Random:
    """Deterministic randomness from hypothesis' bytes, then the OS's once they run out."""
    buffer = bytearray(data)

    def random(n: int) -> bytes:
        taken = bytes(buffer[:n])
        del buffer[:n]
        return taken + os.urandom(n - len(taken))

    return random


@given(st.binary(min_size=0, max_size=100))
def test_new_key_ids_are_valid_and_follow_the_format(data: bytes) -> None:
    key_id = signing.new_key_id(_random_from(data))
    assert key_id.startswith("tgk_") and len(key_id) == 4 + 32 + 6
    assert set(key_id[4:]) <= set(signing.BASE62)
    assert signing.key_id_valid(key_id) and signing.parse_key_id(key_id) == key_id
    expected = zlib.crc32(key_id[:-6].encode())
    decoded = 0
    for c in key_id[-6:]:
        decoded = decoded * 62 + signing.BASE62.index(c)
    assert decoded == expected  # the checksum is CRC32 of prefix + body, in base62


@given(
    st.binary(min_size=64, max_size=64),
    st.integers(min_value=4, max_value=41),
    st.sampled_from(signing.BASE62),
)
def test_any_single_character_change_breaks_the_checksum(
    data: bytes, position: int, replacement: str
) -> None:
    key_id = signing.new_key_id(_random_from(data))
    assume(key_id[position] != replacement)
    altered = key_id[:position] + replacement + key_id[position + 1 :]
    assert not signing.key_id_valid(altered)
    with pytest.raises(MalformedRequest) as info:
        signing.parse_key_id(altered)
    assert info.value.field == "x-tg-key"


@given(ascii_and_more)
def test_arbitrary_text_is_not_a_key_id(text: str) -> None:
    assume(not text.startswith("tgk_"))
    assert not signing.key_id_valid(text)


@pytest.mark.parametrize(
    "text",
    [
        KEY_ID + "a",
        KEY_ID[:-1],
        "TGK_" + KEY_ID[4:],
        KEY_ID.replace("tgk_", "tgs_"),
        " " + KEY_ID,
        KEY_ID + "\n",
    ],
)
def test_key_id_refusals(text: str) -> None:
    assert not signing.key_id_valid(text)


def test_base62_sampling_is_unbiased_by_rejection() -> None:
    # Bytes >= 248 are dropped: a source of only 255s then zeros yields only "0"s, never a biased character.
    source = _random_from(b"\xff" * 40 + b"\x00" * 200)
    assert signing._random_base62(source, 10) == "0" * 10
    assert signing._random_base62(_random_from(bytes(range(62))), 62) == signing.BASE62


@given(st.binary(min_size=0, max_size=100))
def test_new_secrets_have_the_format(data: bytes) -> None:
    secret = signing.new_hmac_secret(_random_from(data))
    assert secret.startswith("tgs_") and len(secret) == 47 and signing.hmac_secret_valid(secret)
    assert not signing.hmac_secret_valid(secret[:-1]) and not signing.hmac_secret_valid(secret + "a")


def test_secrets_and_nonces_differ_each_time() -> None:
    assert len({signing.new_hmac_secret(os.urandom) for _ in range(50)}) == 50
    nonces = {signing.new_nonce(os.urandom) for _ in range(50)}
    assert len(nonces) == 50 and all(signing.parse_nonce(n) == n for n in nonces)


# --- the window ------------------------------------------------------------------------------------------------


def test_window_bounds_are_inclusive() -> None:
    now = 1_700_000_000_000
    assert signing.check_window(now, now, 5000, 1000) is Window.OK
    assert signing.check_window(now - 5000, now, 5000, 1000) is Window.OK
    assert signing.check_window(now - 5001, now, 5000, 1000) is Window.STALE
    assert signing.check_window(now + 1000, now, 5000, 1000) is Window.OK
    assert signing.check_window(now + 1001, now, 5000, 1000) is Window.FUTURE
    assert signing.check_window(now + 1, now, 5000, 0) is Window.FUTURE


@given(st.integers(min_value=0, max_value=10**16), st.integers(min_value=-(10**6), max_value=10**6))
def test_window_classifies_every_offset(now: int, offset: int) -> None:
    result = signing.check_window(now + offset, now, signing.DEFAULT_WINDOW_MS, signing.DEFAULT_FUTURE_MS)
    if offset > 1000:
        assert result is Window.FUTURE
    elif offset < -5000:
        assert result is Window.STALE
    else:
        assert result is Window.OK


@pytest.mark.parametrize(("window", "future"), [(0, 0), (60_001, 0), (5000, 1001), (5000, -1)])
def test_window_settings_beyond_the_standard_are_refused(window: int, future: int) -> None:
    with pytest.raises(ValueError, match="_ms must be"):
        signing.check_window(1, 1, window, future)
