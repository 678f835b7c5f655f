"""What the audit log never stores: secrets, tokens, passwords, signatures, key material (pure: re only).

`mask_event(event)` returns the event as it may be recorded. Whatever a caller sends, after masking:

1. **Details by name.** A detail whose NAME suggests a secret has its value replaced whole by `MASK` ("***"):
   every name the kit's log redactor treats as sensitive (`tradeguard.observability.redact.is_sensitive_key`:
   password, passwd, passphrase, secret, token, api_key, authorization, auth_header, cookie, private_key, seed,
   totp, otp_code, credential, signature, card_number, cvv, session, pan), and besides, with the name split into
   words (camelCase, "-", ".", " " and "_" all separate words): a word otp, mfa, pin, pem, jwt, jwk, jws, bearer,
   hmac, passcode, pwd, csrf, xsrf; the phrases recovery code, backup code, verification code; and a last word
   key or keys (signing_key, accessKey, x-data-key — but not key_id, key_name, key_version). A name that itself
   contains a secret (rule 2 changes it) is masked as a name and its value is masked whole.
2. **Values by content**, in every text field (method, principal, account_id, api_key_id, caller, source_ip,
   resource, action, quota_decision, risk_decision, status_code, request_id, trace_id) and every detail name
   and value, each match replaced by `MASK`:
   - PEM blocks of any kind (private keys, certificates, …), from `-----BEGIN` to the matching `-----END …-----`
     line or to the end of the text when truncated;
   - JWTs (`eyJ…`, the kit's pattern, here before the runs below could cut one up), Tradeguard HMAC secrets
     (`tgs_` + base62, any length), AWS access key ids (AKIA…, ASIA…, …);
   - credentials in URLs (`scheme://user:password@` → `scheme://***@`);
   - runs of base64/base64url/hex characters (A-Z a-z 0-9 + / _ - and `=` padding) that contain, once the
     identifiers below are taken out, either 40 or more hex digits in a row (HMAC-SHA256 and Ed25519
     signatures such as `x-tg-signature`, 160-bit-or-larger keys and digests in hex), or 32 or more characters
     mixing upper case, lower case and digits, or 40 or more with two of those three (keys and tokens in
     base64: ≥ 192 bits; a random 256-bit key in base64 lacks two of the three far less than once in 10^9),
     or 16 or more RFC 4648 base32 characters (A-Z 2-7) in a row with at least two letters and two digits
     (TOTP seeds);
   - then everything the kit's log redactor finds (`redact_text`): JWTs (`eyJ…`), `Bearer`/`Basic`
     credentials, credential header lines (authorization:, cookie:, x-api-key: …), `key=value` and JSON
     `"key": "value"` pairs with a sensitive key (password=, token=, signature=, …), PEM private keys, Luhn-valid
     payment card numbers, `tg_` keys, and the secrets registered with `register_secret`.
   Identifiers that look random but are not secret stay visible: API key ids (`tgk_` + 38 base62), order ids
   (`ord_` + 26 Crockford base32), user ids (`usr_` + 26 lowercase Crockford base32), UUIDs, and 32-hex-digit
   request and trace ids. The price: a bare 128-bit key written as 32 hex digits or as 22-24 base64 characters
   is not told from an id and is not masked; a run such as a path of 32+ characters mixing cases and digits (or
   of 40+ with two of the three) outside those ids is masked though it is no secret (fail closed). An
   `api_key_id` that is a well-formed key id is kept as it is. The event id is not masked (it is the recorder's
   idempotency key, restricted to [A-Za-z0-9_.:-]{1,128}); the core refuses one that `looks_secret`.
3. **Sizes**, after masking (so that a cut never leaves part of a secret unmasked): a text field longer than
   `MAX_TEXT_CHARS`, a detail name longer than `MAX_NAME_CHARS` or value longer than `MAX_VALUE_CHARS` is cut to
   that many characters followed by `TRUNCATED`; of more than `MAX_DETAILS` details, the first `MAX_DETAILS - 1`
   by name are kept and one more, named `TRUNCATED`, says how many were dropped. Names that become equal by
   masking or cutting keep one detail (the first by original name; masked if any of them was).

Numbers, enums and times are not changed. `mask_event` is idempotent.

Speed (the append path masks every event): `mask_text` remembers its answers for texts up to 256 characters
(most fields repeat: methods, principals, callers, decisions), at most 8,192 of them (all forgotten when full),
and forgets them all when the log redactor's registered secrets change (its answers would); `mask_event` reads
the text fields in one go and looks at the `api_key_id` rule, the cut and a copy of the event only when masking
changed something. The answers are exactly the reference's: `mask_text_reference` and `mask_event_reference`,
the same rules without a memory of their own, are what the tests compare them with.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Final

from services.audit.model import TEXT_FIELDS, Event
from tradeguard.observability import redact
from tradeguard.observability.redact import REDACTED, is_sensitive_key, redact_text

__all__ = [
    "MASK",
    "MAX_DETAILS",
    "MAX_NAME_CHARS",
    "MAX_TEXT_CHARS",
    "MAX_VALUE_CHARS",
    "TRUNCATED",
    "looks_secret",
    "mask_event",
    "mask_event_reference",
    "mask_text",
    "mask_text_reference",
    "secret_name",
]

MASK: Final = "***"
TRUNCATED: Final = "…[truncated]"
MAX_TEXT_CHARS: Final = 1024
MAX_NAME_CHARS: Final = 128
MAX_VALUE_CHARS: Final = 2048
MAX_DETAILS: Final = 64


_NAME_WORDS: Final = frozenset(
    {"otp", "mfa", "pin", "pem", "jwt", "jwk", "jws", "bearer", "hmac", "passcode", "pwd", "csrf", "xsrf"}
)
_NAME_PHRASES: Final = ("recovery_code", "backup_code", "verification_code")
_KEY_WORDS: Final = frozenset({"key", "keys"})
_CAMEL: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS: Final = re.compile(r"[-. _]+")

_KEY_ID: Final = re.compile(r"tgk_[0-9A-Za-z]{38}")
# Identifiers taken out of a run before it is judged: key ids, order ids, user ids, UUIDs, 32-hex-digit ids.
_IDS: Final = re.compile(
    r"tgk_[0-9A-Za-z]{38}(?![0-9A-Za-z])"
    r"|ord_[0-9A-HJKMNP-TV-Z]{26}(?![0-9A-Za-z])"
    r"|usr_[0-9a-z]{26}(?![0-9A-Za-z])"
    r"|(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}(?![0-9A-Fa-f])"
    r"|(?<![0-9A-Fa-f])[0-9A-Fa-f]{32}(?![0-9A-Fa-f])"
)
_HEX40: Final = re.compile(r"[0-9A-Fa-f]{40}")
# First pass: shapes that start with a literal (found wherever they start, even inside a longer run), each
# searched only when its literal is in the text.
_FIRST: Final = (
    ("-----BEGIN", re.compile(r"-----BEGIN(?s:.*?)(?:-----END[^\r\n]*?-----|\Z)"), MASK),
    ("eyJ", re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), MASK),
    ("tgs_", re.compile(r"tgs_[0-9A-Za-z]+"), MASK),
    ("://", re.compile(r"://[^/\s:@]+:[^/\s@]*@"), "://" + MASK + "@"),
)
# Second pass: runs of base64/base64url/hex characters, judged whole.
_RUN: Final = re.compile(r"[A-Za-z0-9+/_-]{16,}=*")
_AWS: Final = re.compile(r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[0-9A-Z]{16}")
_BASE32_IN: Final = re.compile(r"[A-Z2-7]{16,}")
_CACHE_MAX_LEN: Final = 256


_DIGIT: Final = re.compile(r"[0-9]")
_PLAIN_ID: Final = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _random_looking(text: str) -> bool:
    """32+ characters with upper case, lower case and digits, or 40+ with two of those three."""
    if len(text) < 32:
        return False
    classes = (text.lower() != text) + (text.upper() != text) + (_DIGIT.search(text) is not None)
    return classes == 3 or (classes == 2 and len(text) >= 40)


def _secret_run(run: str) -> bool:
    if len(run) < 40 and run.lower() == run:
        # no upper-case letter: no AWS key id, no base32 run; 40 hex digits and a random-looking part with two
        # classes of characters need 40 characters (a part of the residual is never longer than the run)
        return False
    return _judged_secret(run)


def _judged_secret(run: str) -> bool:
    """`_secret_run` without its shortcut (the tests check the shortcut against it)."""
    if len(run) >= 20 and _AWS.search(run) is not None:
        return True
    residual = _IDS.sub(" ", run) if len(run) >= 26 else run
    if len(residual) >= 40 and _HEX40.search(residual) is not None:
        return True
    for m in _BASE32_IN.finditer(residual):
        digits = len(_DIGIT.findall(m.group(0)))
        if digits >= 2 and len(m.group(0)) - digits >= 2:
            return True
    if len(residual) < 32:
        return False
    return any(_random_looking(part) for part in residual.split(" "))


def _run(m: re.Match[str]) -> str:
    return MASK if _secret_run(m.group(0)) else m.group(0)


def _own_rules(text: str) -> str:
    if len(text) in (32, 36) and _PLAIN_ID.fullmatch(text) is not None:  # a request, trace or event id
        return text
    for needle, pattern, replacement in _FIRST:
        if needle in text:
            text = pattern.sub(replacement, text)
    if len(text) < 16:
        return text
    # most texts have no secret run: changed (by the same matches) only if one is
    for m in _RUN.finditer(text):
        if _secret_run(m.group(0)):
            return _RUN.sub(_run, text)
    return text


_CACHE_SIZE: Final = 8192


def mask_text_reference(text: str) -> str:
    """`mask_text` without any memory of its own (what the tests compare `mask_text` with)."""
    if not text:
        return text
    masked = redact_text(_own_rules(text))
    if REDACTED in masked:
        masked = masked.replace(REDACTED, MASK)
    return masked


class _Answers:
    """`mask_text`'s answers, valid for one set of the log redactor's registered secrets (its `generation()` at the
    time: a new one on every `register_secret`/`forget_secret`)."""

    registered: object = None
    cache: dict[str, str] = {}  # noqa: RUF012 - replaced whole, never shared


def _answers() -> dict[str, str]:
    """The remembered answers, for the redactor's registered secrets as they are now."""
    registered = redact.generation()
    if registered is not _Answers.registered:
        _Answers.registered, _Answers.cache = registered, {"": ""}
    return _Answers.cache


def mask_text(text: str) -> str:
    """`text` with every secret found by content (rule 2) replaced by `MASK`."""
    if len(text) > _CACHE_MAX_LEN:
        return mask_text_reference(text)
    cache = _answers()
    masked = cache.get(text)
    if masked is None:
        masked = mask_text_reference(text)
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
            cache[""] = ""
        cache[text] = masked
    return masked


def looks_secret(text: str) -> bool:
    """True when masking by content would change `text`."""
    return mask_text(text) != text


@functools.lru_cache(maxsize=4096)
def secret_name(name: str) -> bool:
    """True when a detail named `name` holds a secret by its name alone (rule 1)."""
    if is_sensitive_key(name):
        return True
    words = [w for w in _SEPARATORS.split(_CAMEL.sub("_", name).lower()) if w]
    if not words:
        return False
    if words[-1] in _KEY_WORDS or not _NAME_WORDS.isdisjoint(words):
        return True
    joined = "_".join(words)
    return any(phrase in joined for phrase in _NAME_PHRASES) or is_sensitive_key(joined)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def _mask_field(name: str, value: str) -> str:
    if name == "api_key_id" and _KEY_ID.fullmatch(value) is not None:
        return value
    return _cut(mask_text(value), MAX_TEXT_CHARS)


def _mask_details(details: Mapping[str, str], mask: Callable[[str], str]) -> dict[str, str]:
    masked: dict[str, str] = {}
    for name in sorted(details):
        new_name = mask(name)
        hidden = new_name != name or secret_name(name)
        new_name = _cut(new_name, MAX_NAME_CHARS)
        value = MASK if hidden else _cut(mask(details[name]), MAX_VALUE_CHARS)
        if new_name in masked:
            if hidden:
                masked[new_name] = MASK
            continue
        masked[new_name] = value
    if len(masked) > MAX_DETAILS:
        kept = sorted(masked)[: MAX_DETAILS - 1]
        dropped = len(masked) - len(kept)
        masked = {name: masked[name] for name in kept}
        masked[TRUNCATED] = f"{dropped} more"
    return masked


_text_values: Final = operator.attrgetter(*TEXT_FIELDS)


def mask_event(event: Event) -> Event:
    """The event as it may be recorded (see the module)."""
    changes: dict[str, object] = {}
    answers = _answers()
    for name, value in zip(TEXT_FIELDS, _text_values(event), strict=True):
        masked = answers.get(value)  # "" is there: empty fields stay empty
        if masked is None:
            masked = mask_text(value)
        if masked != value or len(value) > MAX_TEXT_CHARS:
            masked = _mask_field(name, value)  # the key id rule and the cut: as the reference does
            if masked != value:
                changes[name] = masked
    if event.details:
        details = _mask_details(event.details, mask_text)
        if details != event.details:
            changes["details"] = details
    return replace(event, **changes) if changes else event  # type: ignore[arg-type]


def mask_event_reference(event: Event) -> Event:
    """`mask_event` without any memory (what the tests compare `mask_event` with)."""
    changes: dict[str, object] = {}
    for name in TEXT_FIELDS:
        value: str = getattr(event, name)
        if value:
            if name == "api_key_id" and _KEY_ID.fullmatch(value) is not None:
                continue
            masked = _cut(mask_text_reference(value), MAX_TEXT_CHARS)
            if masked != value:
                changes[name] = masked
    if event.details:
        details = _mask_details(event.details, mask_text_reference)
        if details != event.details:
            changes["details"] = details
    return replace(event, **changes) if changes else event  # type: ignore[arg-type]
