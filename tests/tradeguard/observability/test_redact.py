from __future__ import annotations

import base64
import io
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tradeguard.observability.logging import configure_logging, get_logger
from tradeguard.observability.redact import (
    REDACTED,
    Trusted,
    forget_secret,
    is_sensitive_key,
    redact,
    redact_processor,
    redact_text,
    register_secret,
)

# ---------------------------------------------------------------------------------------------- helpers


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwt(signature: str, subject: str = "user-1") -> str:
    header = _b64url(b'{"alg":"HS256","typ":"JWT"}')
    payload = _b64url(json.dumps({"sub": subject, "exp": 1900000000}).encode())
    return f"{header}.{payload}.{signature}"


def _luhn_check_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def _card(body: str) -> str:
    return body + _luhn_check_digit(body)


VISA = _card("411111111111111")  # 4111111111111111
assert VISA == "4111111111111111"


def _render(event: str, *, use_json: bool, exc: BaseException | None = None, **fields: Any) -> str:
    out = io.StringIO()
    configure_logging(json=use_json, stream=out, level="debug")
    log = get_logger("test.redact")
    if exc is not None:
        try:
            raise exc
        except BaseException:
            log.error(event, exc_info=True, **fields)
    else:
        log.info(event, **fields)
    return out.getvalue()


# ------------------------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abcDEF123456.xyz", "abcDEF123456.xyz"),
        ("authorization: Basic Zm9vOmJhcg==", "Zm9vOmJhcg=="),
        ("proxy-authorization: Digest username=bob, response=abc123", "abc123"),
        ("X-Api-Key: k3y-Value_987", "k3y-Value_987"),
        ("cookie: sid=abcdef123456; theme=dark", "abcdef123456"),
        ("calling upstream with Bearer tok-en_1234567890 now", "tok-en_1234567890"),
        ("got basic dXNlcjpwYXNz in header", "dXNlcjpwYXNz"),
        ("login password=hunter2hunter2 user=bob", "hunter2hunter2"),
        ("passwd: s3cr3tS3cr3t", "s3cr3tS3cr3t"),
        ("client_secret=abcdef0123456789&grant_type=x", "abcdef0123456789"),
        ("refresh_token = r3fr3sh-t0k3n", "r3fr3sh-t0k3n"),
        ('{"password": "p@ss w0rd with spaces", "user": "bob"}', "p@ss w0rd with spaces"),
        ("{'api_key': 'AKIA123456789', 'n': 1}", "AKIA123456789"),
        ('{"apiKey":"camelCaseKey123"}', "camelCaseKey123"),
        ("private_key=MIIEvQIBADANBgkq", "MIIEvQIBADANBgkq"),
        ("totp_seed: JBSWY3DPEHPK3PXP", "JBSWY3DPEHPK3PXP"),
        ("otp_code=123456", "123456"),
        ("cvv=123 ok", "123"),
        ("pan=4000056655665556", "4000056655665556"),
        ("session=abcdef sessionid", "abcdef"),
        ("signature: 9f86d081884c7d659a2feaa0c55ad015", "9f86d081884c7d659a2feaa0c55ad015"),
        ("token: Bearer abc123def456", "abc123def456"),
        (f"jwt {_jwt('c2lnbmF0dXJlLXZhbHVl')} end", "c2lnbmF0dXJlLXZhbHVl"),
        (f"jwt {_jwt('')} (alg none)", _jwt("")),
        ("api key tg_AbCdEfGhIjKlMnOpQrStUv0123 issued", "tg_AbCdEfGhIjKlMnOpQrStUv0123"),
        ("card 4111 1111 1111 1111 charged", "4111 1111 1111 1111"),
        ("card 4111-1111-1111-1111.", "4111-1111-1111-1111"),
        ("card 4111111111111111,", "4111111111111111"),
        ("amex 378282246310005 ok", "378282246310005"),
        ("qty 3 5555 5555 5555 4444 units", "5555 5555 5555 4444"),
        ("mc 2223003122003222 ok", "2223003122003222"),
    ],
)
def test_patterns_are_masked(text: str, secret: str) -> None:
    masked = redact_text(text)
    assert secret not in masked
    assert REDACTED in masked


def test_pem_private_key_block_is_masked() -> None:
    pem = (
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oDhu\n"
        "oAoGCCqGSM49AwEHoUQDQgAE\n-----END EC PRIVATE KEY-----"
    )
    masked = redact_text(f"loaded {pem} from disk")
    assert masked == f"loaded {REDACTED} from disk"
    truncated = redact_text("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC")
    assert truncated == REDACTED


def test_header_keeps_name_and_scheme() -> None:
    assert redact_text("Authorization: Bearer abc") == f"Authorization: {REDACTED}"
    assert redact_text("use Bearer abcdef please") == f"use Bearer {REDACTED} please"
    assert redact_text("password=abc next") == f"password={REDACTED} next"
    # A scheme word after a scheme word is not taken as the credential.
    assert redact_text("Basic Bearer abcdefgh1234") == f"Basic Bearer {REDACTED}"


@pytest.mark.parametrize(
    "text",
    [
        "order 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 filled",
        "client order id Ab3_-x9QzLmN0pQrStUvWxYz0123456789abcdefGHIJ",
        "ORD-01J9ZK3M8W4T6Y2V0B5N7Q1R3S",
        "price 101.25 qty 1000 notional 101250.00",
        "price 4111111111111111.50",
        "ts 2026-11-25T11:33:55.317859Z",
        "epoch ns 1764070435317859000 and ms 1764070435317",
        "order 4111111111111112 (not Luhn-valid)",
        "ids 1234567890123456789012345",
        "span_id=00f067aa0ba902b7 trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
        "company=ACME expand=true",
        "request_id=3f2c1a9b8e7d4c6a",
        "symbol=AAPL side=BUY tif=IOC",
        "basically fine",
        "hex 0x4111111111111111",
        "tg_short123",
    ],
)
def test_false_positives_stay_visible(text: str) -> None:
    assert redact_text(text) == text


def test_sensitive_keys() -> None:
    key: object  # str and bytes keys here, an int among the harmless ones below
    for key in [
        "password",
        "Password",
        "db-password",
        "X-Api-Key",
        "apiKey",
        "client_secret",
        "refresh_token",
        "Authorization",
        "auth_header",
        "Cookie",
        "private_key",
        "totp_seed",
        "otp_code",
        "credentials",
        "signature",
        "card_number",
        "cardNumber",
        "pan",
        "card_pan",
        "cvv",
        "session_id",
        b"password",
    ]:
        assert is_sensitive_key(key), key
    for key in ["span", "span_id", "company", "expand", "user", "order_id", "price", "event", 3]:
        assert not is_sensitive_key(key), key


def test_redact_masks_whole_value_of_sensitive_key_whatever_its_type() -> None:
    value = {
        "user": "bob",
        "password": {"nested": "x", "list": [1, 2]},
        "tokens": ["a", "b"],
        "cvv": 123,
        "deep": [{"inner": ({"X-Api-Key": b"abc"},)}],
        "cookie": None,
    }
    assert redact(value) == {
        "user": "bob",
        "password": REDACTED,
        "tokens": REDACTED,
        "cvv": REDACTED,
        "deep": [{"inner": ({"X-Api-Key": REDACTED},)}],
        "cookie": REDACTED,
    }


def test_redact_recurses_through_containers_bytes_and_exceptions() -> None:
    assert redact(["Bearer abcdefgh", ("password=xyz",)]) == [f"Bearer {REDACTED}", (f"password={REDACTED}",)]
    assert redact({"token=abc"}) == {f"token={REDACTED}"}
    assert redact(frozenset({"x"})) == frozenset({"x"})
    assert redact(b"Authorization: Basic Zm9v") == f"Authorization: {REDACTED}"
    assert redact(b"\x00\x01 plain") == b"\x00\x01 plain"
    assert redact(ValueError("bad secret: s3cr3t")) == f"ValueError: bad secret: {REDACTED}"
    assert redact(42) == 42
    assert redact(1.5) == 1.5
    assert redact(None) is None


def test_redact_checks_repr_of_other_objects() -> None:
    class Creds:
        def __repr__(self) -> str:
            return "Creds(password='hunter2hunter2')"

    class Plain:
        pass

    assert "hunter2hunter2" not in str(redact(Creds()))
    plain = Plain()
    assert redact(plain) is plain


def test_redact_survives_cycles() -> None:
    cyclic: list[Any] = ["Bearer abcdefgh"]
    cyclic.append(cyclic)
    out = redact(cyclic)
    assert "abcdefgh" not in repr(out)


def test_registered_secrets() -> None:
    secret = "Sup3r-S3cret!Value"
    assert redact_text(f"xx{secret}yy") == f"xx{secret}yy"
    register_secret(secret)
    try:
        assert redact_text(f"xx{secret}yy") == f"xx{REDACTED}yy"
        assert redact({"note": [f"a {secret} b"]}) == {"note": [f"a {REDACTED} b"]}
        # Registered regex metacharacters are literal.
        register_secret("a.b*c+d?e(f)")
        assert redact_text("a.b*c+d?e(f)") == REDACTED
        assert redact_text("aXbbbcdde(f)") == "aXbbbcdde(f)"
    finally:
        forget_secret(secret)
        forget_secret("a.b*c+d?e(f)")
    assert redact_text(f"xx{secret}yy") == f"xx{secret}yy"
    register_secret("short")  # under 8 characters: ignored
    assert redact_text("a short note") == "a short note"
    forget_secret("never-registered")


@pytest.mark.parametrize("use_json", [True, False])
def test_logged_exception_text_is_redacted(use_json: bool) -> None:
    out = _render("failed", use_json=use_json, exc=RuntimeError("login password=hunter2hunter2 failed"))
    assert "hunter2hunter2" not in out
    assert "RuntimeError" in out
    assert REDACTED in out


def test_processor_leaves_timestamp_and_level_alone() -> None:
    out = _render("hello", use_json=True, price=101.25, order_id="9f86d081884c7d659a2f", qty=3)
    line = json.loads(out)
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert line["price"] == 101.25
    assert line["order_id"] == "9f86d081884c7d659a2f"
    assert line["qty"] == 3


# ------------------------------------------------------------------------------------ property test

SAFE_ALPHABET = string.ascii_letters + string.digits + "-_.~+/"
B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"

secrets_st = st.text(alphabet=SAFE_ALPHABET, min_size=12, max_size=48)
neutral_text = st.text(alphabet=string.ascii_letters + string.digits + " .,:;!?()[]{}#@%", max_size=30)
SENSITIVE_KEYS = [
    "password",
    "Password",
    "db-password",
    "X-Api-Key",
    "apiKey",
    "client_secret",
    "refresh_token",
    "Authorization",
    "cookie",
    "private_key",
    "totp_seed",
    "otp_code",
    "credentials",
    "signature",
    "card_number",
    "card_pan",
    "cvv",
    "session_id",
    "passphrase",
]
NEUTRAL_KEYS = ["payload", "items", "note", "data", "ctx", "detail", "order"]


@st.composite
def card_numbers(draw: st.DrawFn) -> tuple[str, str]:
    prefix = draw(st.sampled_from(["4", "51", "55", "2221", "34", "37", "6011", "65", "35"]))
    length = draw(st.integers(min_value=13, max_value=19))
    rest = draw(
        st.text(alphabet=string.digits, min_size=length - len(prefix) - 1, max_size=length - len(prefix) - 1)
    )
    digits = _card(prefix + rest)
    sep = draw(st.sampled_from(["", " ", "-"]))
    formatted = sep.join(digits[i : i + 4] for i in range(0, len(digits), 4)) if sep else digits
    return digits, formatted


@st.composite
def nest(draw: st.DrawFn, leaf: Any) -> Any:
    """Wrap ``leaf`` in a random path of dicts (neutral keys) and lists."""
    value = leaf
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if draw(st.booleans()):
            siblings = draw(st.dictionaries(st.sampled_from(NEUTRAL_KEYS), neutral_text, max_size=2))
            siblings[draw(st.sampled_from(NEUTRAL_KEYS))] = value
            value = siblings
        else:
            others = draw(st.lists(neutral_text, max_size=2))
            others.insert(draw(st.integers(min_value=0, max_value=len(others))), value)
            value = others
    return value


@st.composite
def events_with_secret(
    draw: st.DrawFn,
) -> tuple[list[str], str, dict[str, Any], BaseException | None, str | None]:
    """(strings that must be absent, event text, fields, exception to log, secret to register)."""
    mode = draw(
        st.sampled_from(
            [
                "key",
                "bearer",
                "password_kv",
                "authorization",
                "registered",
                "jwt",
                "card",
                "tg_key",
                "json_kv",
            ]
        )
    )
    secret = draw(secrets_st)
    before, after = draw(neutral_text), draw(neutral_text)
    forbidden = [secret]
    registered: str | None = None
    text: str | None = None
    leaf: Any
    if mode == "key":
        key = draw(st.sampled_from(SENSITIVE_KEYS))
        inner = draw(st.sampled_from(["plain", "list", "dict"]))
        raw: Any = secret if inner == "plain" else [secret] if inner == "list" else {"value": secret}
        leaf = {key: raw}
    else:
        if mode == "bearer":
            text = f"Bearer {secret}"
        elif mode == "password_kv":
            text = f"{draw(st.sampled_from(['password', 'token', 'secret', 'api_key']))}={secret}"
        elif mode == "authorization":
            text = f"Authorization: {secret}"
        elif mode == "json_kv":
            text = f'"password": "{secret}"'
        elif mode == "registered":
            registered = secret
            text = secret
        elif mode == "jwt":
            signature = draw(st.text(alphabet=B64URL_ALPHABET, min_size=12, max_size=64))
            token = _jwt(signature, subject=secret)
            forbidden = [token, signature]
            text = token
        elif mode == "card":
            digits, formatted = draw(card_numbers())
            forbidden = [digits, formatted]
            text = formatted
        elif mode == "tg_key":
            body = draw(st.text(alphabet=string.ascii_letters + string.digits, min_size=20, max_size=40))
            forbidden = ["tg_" + body]
            text = "tg_" + body
        assert text is not None
        if mode == "registered":
            glue = draw(st.sampled_from(["", " "]))
            text = f"{before}{glue}{text}{glue}{after}"
        else:
            text = f"{before} {text} {after}"
        leaf = text
    where = draw(st.sampled_from(["field", "event", "exception", "exception_value"]))
    if mode == "key" or where == "field":
        fields = {draw(st.sampled_from(NEUTRAL_KEYS)): draw(nest(leaf))}
        return forbidden, draw(neutral_text), fields, None, registered
    assert text is not None
    if where == "event":
        return forbidden, text, {}, None, registered
    if where == "exception":
        return forbidden, "handler failed", {}, RuntimeError(text), registered
    return forbidden, "handler failed", {"error": ValueError(text)}, None, registered


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=events_with_secret(), use_json=st.booleans())
def test_secret_never_reaches_rendered_output(
    case: tuple[list[str], str, dict[str, Any], BaseException | None, str | None], use_json: bool
) -> None:
    forbidden, event, fields, exc, registered = case
    # The neutral filler must not itself contain a forbidden string (it would be "leaked" by the test).
    blob = event + json.dumps(fields, default=repr) + str(exc)
    for needle in forbidden:
        assume(needle.strip() and blob.count(needle) <= 1 and needle not in "test.redact handler failed")
    if registered is not None:
        register_secret(registered)
    try:
        out = _render(event, use_json=use_json, exc=exc, **fields)
    finally:
        if registered is not None:
            forget_secret(registered)
    for needle in forbidden:
        assert needle not in out, (needle, out)
    assert REDACTED in out


FRAGMENTS = [
    "password",
    "PassWord",
    "paſsword",  # noqa: RUF001 - long s: casefolds to "s", matched by the case-insensitive pattern too
    "secret",
    "api-KEY",
    "Authorization",
    "x-auth-token",
    "cookie",
    "otp_code",
    "card_number",
    "pan",
    "span",
    "Bearer",
    "basic",
    "eyJ",
    "tg_",
    "-----BEGIN PRIVATE KEY-----",
    "=",
    ": ",
    " ",
    "\n",
    "'",
    '"',
    ".",
    "-",
    "4111",
    "1111",
    "5",
    "0",
    "abcdefghij",
    "ABCDEFGHIJKLMNOPQRST",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join))
def test_fast_path_never_skips_a_match(text: str) -> None:
    from tradeguard.observability.redact import _master, _replace

    assert redact_text(text) == _master.sub(_replace, text)


def test_key_value_pairs_as_in_grpc_metadata_are_masked() -> None:
    metadata = (
        ("x-api-key", "k3yV4lu3abcdef"),
        ("user-agent", "grpc-python"),
        ("authorization", "opaque-value-123"),
    )
    assert redact(metadata) == (
        ("x-api-key", REDACTED),
        ("user-agent", "grpc-python"),
        ("authorization", REDACTED),
    )
    assert redact([["password", "hunter2hunter2"]]) == [["password", REDACTED]]
    assert redact(("order_id", "ord_01ARZ3NDEKTSV4RRFFQ69G5FAV")) == (
        "order_id",
        "ord_01ARZ3NDEKTSV4RRFFQ69G5FAV",
    )


# ---------------------------------------------------------------------------------- the kit's own fields


def test_trusted_fields_are_passed_through_unscanned_but_only_those() -> None:
    kit_id = Trusted(
        "0123456789abcdef" + "4111111111111111"
    )  # looks like a card: the kit made it, not a caller
    event = {
        "request_id": kit_id,
        "caller_request_id": "4111111111111111",  # a plain str, as anything a caller sent is
        "token": Trusted("not really trusted: the key says secret"),
        "nested": [Trusted(VISA)],  # only a field's own value is passed through
        "event": "rpc",
    }
    out = redact_processor(None, "info", dict(event))
    assert out["request_id"] is kit_id
    assert out["caller_request_id"] == REDACTED
    assert out["token"] == REDACTED
    assert out["nested"] == [REDACTED]
    assert redact_text(Trusted(f"card {VISA}")) == f"card {REDACTED}"  # scanning a Trusted string still works
    assert str(Trusted("x")) == "x" and json.dumps({"k": Trusted("x")}) == '{"k": "x"}'
