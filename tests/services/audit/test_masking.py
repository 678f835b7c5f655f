"""Masking (services/audit/masking.py): random secrets of every kind the module names, embedded anywhere in an
event (any text field, a detail's value or name), never survive; details named like secrets are masked whole;
identifiers that only look random stay visible; sizes are bounded with the cut marked; masking is idempotent; the
fast path (remembered answers) gives exactly the reference's answers, also after a secret is registered."""

from __future__ import annotations

import base64
import random
from dataclasses import fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.audit import masking
from services.audit.masking import (
    MASK,
    MAX_DETAILS,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MAX_VALUE_CHARS,
    TRUNCATED,
    looks_secret,
    mask_event,
    mask_event_reference,
    mask_text,
    mask_text_reference,
    secret_name,
)
from services.audit.model import Event, Outcome
from tradeguard import signing
from tradeguard.observability.redact import forget_secret, register_secret

TEXT_FIELDS = [
    f.name
    for f in fields(Event)
    if f.name not in {"event_id", "time_us", "outcome", "details"} and f.type in ("str", str)
]
BASE = Event(event_id="e-1", time_us=1_700_000_000_000_000, outcome=Outcome.OK)
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _secret(kind: str, rnd: random.Random) -> tuple[str, str]:
    """(what is embedded, its secret part that must not survive)."""
    raw = rnd.randbytes(32)
    if kind == "jwt":
        token = "eyJ" + _b64url(rnd.randbytes(12)) + "." + _b64url(rnd.randbytes(24)) + "." + _b64url(raw)
        return token, token
    if kind == "bearer":
        token = "".join(rnd.choice(BASE62) for _ in range(rnd.randint(20, 40)))
        return "Bearer " + token, token
    if kind == "hmac_secret":
        secret = signing.new_hmac_secret(rnd.randbytes)
        return secret, secret
    if kind == "hmac_signature":
        return raw.hex(), raw.hex()
    if kind == "ed25519_signature":
        sig = rnd.randbytes(64).hex()
        return "x-tg-signature: " + sig, sig
    if kind == "base64_key":
        key = base64.b64encode(rnd.randbytes(rnd.randint(32, 64))).decode()
        return key, key
    if kind == "base64url_key":
        key = _b64url(rnd.randbytes(rnd.randint(32, 64)))
        return key, key
    if kind == "pem":
        body = base64.b64encode(rnd.randbytes(120)).decode()
        lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
        return f"-----BEGIN PRIVATE KEY-----\n{lines}\n-----END PRIVATE KEY-----", lines
    if kind == "aws":
        key = "AKIA" + "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        return key, key
    if kind == "password_pair":
        password = "".join(rnd.choice(BASE62) for _ in range(12))
        return f"password={password}", password
    if kind == "url_password":
        password = "".join(rnd.choice(BASE62) for _ in range(12))
        return f"postgresql://audit:{password}@db.local/audit", password
    raise AssertionError(kind)


KINDS = [
    "jwt",
    "bearer",
    "hmac_secret",
    "hmac_signature",
    "ed25519_signature",
    "base64_key",
    "base64url_key",
    "pem",
    "aws",
    "password_pair",
    "url_password",
]
NOISE = st.text(st.characters(codec="utf-8"), max_size=30)


def _strings(event: Event) -> list[str]:
    out = [getattr(event, name) for name in TEXT_FIELDS]
    for name, value in event.details.items():
        out += [name, value]
    return out


@settings(max_examples=300)
@given(
    kind=st.sampled_from(KINDS),
    rnd=st.randoms(use_true_random=False),
    prefix=NOISE,
    suffix=NOISE,
    sep=st.sampled_from([" ", "\n", ", ", "\t"]),
    where=st.sampled_from([*TEXT_FIELDS, "detail value", "detail name"]),
)
def test_secrets_embedded_anywhere_never_survive(
    kind: str, rnd: random.Random, prefix: str, suffix: str, sep: str, where: str
) -> None:
    embedded, secret = _secret(kind, rnd)
    text = prefix + sep + embedded + sep + suffix
    if where == "detail value":
        event = replace(BASE, details={"note": text, "other": "ok"})
    elif where == "detail name":
        event = replace(BASE, details={text: "value", "other": "ok"})
    else:
        event = replace(BASE, **{where: text})  # type: ignore[arg-type]
    masked = mask_event(event)
    stored = _strings(masked)
    windows = {secret[i : i + 12] for i in range(0, max(1, len(secret) - 11))}
    for value in stored:
        assert secret not in value
        assert not any(w in value for w in windows), (kind, value)
    assert MASK in "".join(stored)
    assert masked.details.get("other", "ok") == "ok"
    assert mask_event(masked) == masked


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "Password",
        "clientSecret",
        "access_token",
        "refresh-token",
        "Authorization",
        "x-tg-signature",
        "signature",
        "cookie",
        "Set-Cookie",
        "api_key",
        "x-api-key",
        "apiKey",
        "private_key",
        "privateKeyPem",
        "signing_key",
        "X-Data-Key",
        "otp",
        "otp_code",
        "totp",
        "mfa_code",
        "recovery_code",
        "backup-code",
        "pin",
        "jwt",
        "bearer",
        "hmac",
        "session",
        "credentials",
        "seed",
        "passphrase",
    ],
)
@settings(max_examples=10)
@given(value=NOISE)
def test_details_named_like_secrets_are_masked_whole(name: str, value: str) -> None:
    assert secret_name(name)
    masked = mask_event(replace(BASE, details={name: value, "quantity": "10"}))
    assert masked.details == {name: MASK, "quantity": "10"}


@pytest.mark.parametrize(
    "name", ["key_id", "key_name", "key_version", "status_code", "order_id", "quantity", "spin", "keyname"]
)
def test_ordinary_names_are_kept(name: str) -> None:
    assert not secret_name(name)
    assert mask_event(replace(BASE, details={name: "v1"})).details == {name: "v1"}


@pytest.mark.parametrize(
    "text",
    [
        "/tradeguard.trading.v1.TradingService/PlaceOrder",
        "spiffe://tradeguard.local/ns/default/sa/trading",
        "550e8400-e29b-41d4-a716-446655440000",
        "0123456789abcdef0123456789abcdef",
        "orders/ord_01JD3X4ABCDEFGHJKMNPQRSTVW",
        "users/usr_01jd3x4abcdefghjkmnpqrstvw/keys/tgk_" + "aB3" * 12 + "xy",
        "tgk_" + "aB3" * 12 + "xy",
        "RISK_PRICE_COLLAR: price 101.5 outside 95..105",
        "refused: orders/per-second (10 per 1s)",
        "UNAUTHENTICATED",
        "203.0.113.7",
        "alice@example.com",
    ],
)
def test_identifiers_and_ordinary_text_stay_visible(text: str) -> None:
    assert mask_text(text) == text
    assert not looks_secret(text)


def test_a_well_formed_key_id_is_kept_and_anything_else_in_api_key_id_is_scanned() -> None:
    key_id = signing.new_key_id(random.Random(1).randbytes)
    assert mask_event(replace(BASE, api_key_id=key_id)).api_key_id == key_id
    secret = signing.new_hmac_secret(random.Random(2).randbytes)
    assert mask_event(replace(BASE, api_key_id=secret)).api_key_id == MASK


def test_totp_seeds_and_card_numbers() -> None:
    assert mask_text("seed JBSWY3DPEHPK3PXP") == f"seed {MASK}"
    assert mask_text("card 4111 1111 1111 1111 used") == f"card {MASK} used"


def test_event_ids_that_look_secret_are_told() -> None:
    assert looks_secret("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
    assert looks_secret(random.Random(3).randbytes(32).hex())
    assert not looks_secret("0123456789abcdef0123456789abcdef")


def test_sizes_are_bounded_and_the_cut_marked() -> None:
    long = "word " * 1000
    details = {f"d{i:03}": "x" * (MAX_VALUE_CHARS + 5) for i in range(MAX_DETAILS + 10)}
    details["n" * (MAX_NAME_CHARS + 7)] = "v"
    masked = mask_event(replace(BASE, resource=long, details=details))
    assert masked.resource == long[:MAX_TEXT_CHARS] + TRUNCATED
    assert len(masked.details) == MAX_DETAILS
    assert masked.details[TRUNCATED] == f"{len(details) - (MAX_DETAILS - 1)} more"
    assert masked.details["d000"] == "x" * MAX_VALUE_CHARS + TRUNCATED
    assert "n" * MAX_NAME_CHARS + TRUNCATED not in masked.details  # sorted after the d… names: dropped
    named = mask_event(replace(BASE, details={"n" * (MAX_NAME_CHARS + 7): "v"}))
    assert named.details == {"n" * MAX_NAME_CHARS + TRUNCATED: "v"}
    assert mask_event(masked) == masked


def test_masking_comes_before_the_cut() -> None:
    secret = random.Random(4).randbytes(32).hex()
    head = "zz " * ((MAX_TEXT_CHARS - 10) // 3)
    masked = mask_event(replace(BASE, resource=head + secret)).resource
    assert masked == head + MASK
    assert secret[:8] not in masked


def test_names_that_collide_after_masking_keep_one_masked_detail() -> None:
    one, two = (base64.b64encode(random.Random(i).randbytes(32)).decode() for i in (5, 6))
    masked = mask_event(replace(BASE, details={one: "a", two: "b"}))
    assert masked.details == {MASK: MASK}


def test_an_event_without_secrets_is_returned_unchanged() -> None:
    event = replace(BASE, method="/t.v1.T/Place", principal="alice", details={"quantity": "10"})
    assert mask_event(event) is event


# --- the fast path (remembered answers, one read of the text fields) equals the reference -----------------------

TEXTS = st.one_of(
    NOISE,
    st.builds(
        lambda kind, rnd, before, after: before + _secret(kind, rnd)[0] + after,
        st.sampled_from(KINDS),
        st.randoms(use_true_random=False),
        NOISE,
        NOISE,
    ),
    st.sampled_from(["", "tgk_" + "aB3" * 12 + "xy", "tgk_short", "x" * (MAX_TEXT_CHARS + 3), "word " * 300]),
)
EVENTS = st.builds(
    Event,
    event_id=st.just("e-1"),
    time_us=st.just(1_700_000_000_000_000),
    outcome=st.just(Outcome.OK),
    **{name: TEXTS for name in TEXT_FIELDS},
    details=st.dictionaries(TEXTS, TEXTS, max_size=4),
)


@settings(max_examples=300)
@given(TEXTS)
def test_mask_text_equals_the_reference(text: str) -> None:
    assert mask_text(text) == mask_text_reference(text)
    assert mask_text(text) == mask_text_reference(text)  # remembered now: the same answer


@settings(max_examples=200)
@given(EVENTS)
def test_mask_event_equals_the_reference(event: Event) -> None:
    assert mask_event(event) == mask_event_reference(event)
    assert mask_event(event) == mask_event_reference(event)


def test_a_secret_registered_after_an_answer_was_remembered_is_masked() -> None:
    secret = "hunter2-" + random.Random(7).randbytes(6).hex()
    text = f"note {secret} end"
    assert mask_text(text) == text  # remembered
    register_secret(secret)
    try:
        assert mask_text(text) == f"note {MASK} end"
        assert mask_event(replace(BASE, resource=text)).resource == f"note {MASK} end"
    finally:
        forget_secret(secret)
    assert mask_text(text) == text


RUN_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789+/_-=ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


@settings(max_examples=500)
@given(st.text(RUN_CHARS, min_size=16, max_size=48), st.booleans())
def test_the_runs_shortcut_never_lets_a_secret_pass(run: str, lower: bool) -> None:
    """A run with no upper-case letter shorter than 40 characters is judged not secret without its checks: they
    agree (also for runs that are random hex or lower-case base32/base64 and that end in a real id)."""
    run = run.lower() if lower else run
    assert masking._secret_run(run) == masking._judged_secret(run)
    for tail in ("0123456789abcdef0123456789abcdef", "usr_" + "0123456789abcdefghjkmnpqrs"):
        assert masking._secret_run(run + tail) == masking._judged_secret(run + tail)


def test_short_lower_case_runs_are_judged_by_the_shortcut_as_the_rules_judge_them() -> None:
    rng = random.Random(11)
    hex39 = "".join(rng.choice("0123456789abcdef") for _ in range(39))
    assert not masking._judged_secret(hex39) and not masking._secret_run(hex39)
    hex40 = hex39 + "0"
    assert masking._judged_secret(hex40) and masking._secret_run(hex40)  # 40 hex digits: masked
    mixed = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(40))
    assert masking._secret_run(mixed) == masking._judged_secret(mixed)
    assert mask_text(f"id req-{hex39[:20]}-1 end") == f"id req-{hex39[:20]}-1 end"
