"""Keep secrets out of logs.

Two independent nets, applied to every log event:

* by key: the value of any mapping key whose normalised name (lowercase, ``-`` -> ``_``) contains a sensitive
  word is replaced whole by :data:`REDACTED`, whatever its type;
* by content: every string (at any depth, including rendered tracebacks) is scanned once by a single compiled
  regular expression for JWTs, ``Bearer``/``Basic`` credentials, credential header lines, ``key=value`` pairs
  with a sensitive key, PEM private keys, Luhn-valid payment card numbers, Tradeguard API keys and the exact
  secrets registered with :func:`register_secret`.

Long hex or base64url strings on their own (order ids, hashes) are deliberately left visible.

One exception, for what the kit writes itself: a top-level field whose value is exactly a :class:`Trusted`
string (the request id the kit generated, the registered method name, the status code, the verified peer
identity and address, the guard's verified principal — user, account and key ids issued by the auth service or
the edge — and the kit's own words such as ``auth: jwt``) is not scanned by content (scanning a generated request
id ran the full card-number check, ~15 µs, on every RPC line). Its key is still checked. Nothing a caller sends
is ever made `Trusted`: a caller's ``x-request-id`` or a handler's annotation is a plain ``str`` and is scanned
like any other.
"""

from __future__ import annotations

import re
import threading
from collections.abc import MutableMapping
from typing import Any, Final

__all__ = [
    "REDACTED",
    "Trusted",
    "forget_secret",
    "generation",
    "is_sensitive_key",
    "redact",
    "redact_processor",
    "redact_text",
    "register_secret",
]

REDACTED: Final = "[REDACTED]"

#: Registered secrets shorter than this are ignored: masking every occurrence of a short string would
#: shred unrelated text.
MIN_REGISTERED_SECRET_LENGTH: Final = 8

_MAX_DEPTH: Final = 32

# Substrings of a normalised mapping key that make its value secret.
_SENSITIVE_KEY_WORDS: Final = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "auth_header",
    "cookie",
    "private_key",
    "privatekey",
    "seed",
    "totp",
    "otp_code",
    "credential",
    "signature",
    "card_number",
    "cardnumber",
    "cvv",
    "session",
)
# Matched only as a whole ``_``-separated part of the key: "pan" is inside "span", "company", "expand".
_SENSITIVE_KEY_PARTS: Final = frozenset({"pan"})

# Keys the structlog processor never touches.
_PASSTHROUGH_KEYS: Final = frozenset({"timestamp", "level"})

# The same words, as they appear as keys inside free text (``password=...``, ``"api-key": "..."``).
_TEXT_KEY_WORDS: Final = (
    r"password|passwd|passphrase|secret|token|api[_-]?key|authorization|auth[_-]?header|cookie"
    r"|private[_-]?key|seed|totp|otp[_-]?code|credential|signature|card[_-]?number|cvv|session"
    r"|pan(?![a-z0-9])"
)

# Every alternative starts with a literal or a character class (no leading assertion), so that the regular
# expression engine can skip quickly over characters that cannot start a match; the word-boundary checks
# this requires are done in _replace.
_STATIC_PATTERNS: Final = (
    # PEM private key blocks, also when truncated (no END line): mask to the end of the text.
    r"(?P<pem>-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?s:.*?-----END[A-Z0-9 ]*PRIVATE KEY-----|.*))",
    # JWT / JWS compact serialisation (the signature may be empty for alg=none).
    r"(?P<jwt>eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)",
    # Credential-bearing header lines: keep the name, mask the rest of the line.
    r"(?P<hdr>(?:proxy-authorization|authorization|x-api-key|api-key|x-auth-token|set-cookie"
    r"|cookie)\s*:[ \t]*)(?P<hdrval>[^\r\n]+)",
    # key=value / key: value / "key": "value" with a sensitive key.
    r"(?P<kv>(?:" + _TEXT_KEY_WORDS + r")[a-z0-9_-]{0,32}[\"']?\s*[:=]\s*)"
    r"(?P<kvval>\"(?:[^\"\\\r\n]|\\.)*\"?|'(?:[^'\\\r\n]|\\.)*'?|(?:(?:bearer|basic|token)\s+)?[^\s&]+)",
    # HTTP authentication schemes.
    r"(?P<auth>(?:bearer|basic)\s+)(?!(?:bearer|basic)\b)(?P<authval>[A-Za-z0-9._~+/=-]+)",
    # Tradeguard API keys.
    r"(?P<tgkey>tg_[A-Za-z0-9]{20,})",
    # Runs of 13+ digits, optionally grouped by spaces or dashes, not part of a word or a decimal number;
    # the card numbers inside are found (issuer range, length, Luhn) by the replacement function.
    r"(?P<card>[0-9](?:[ -]?[0-9]){12,100}(?![A-Za-z0-9]|\.[0-9]))",
)

_lock = threading.Lock()
_registered: set[str] = set()


class Trusted(str):
    """A string the kit produced itself, never caller data: the log processor passes it through unscanned
    (only as the direct value of an event field; nested, or once transformed into a plain ``str``, it is
    scanned again). Never wrap anything a caller sent."""

    __slots__ = ()


_master: Final = re.compile("|".join(_STATIC_PATTERNS), re.IGNORECASE)
# Necessary conditions for _master to match anything: one of these in the casefolded text ...
_NEEDLES: Final = (
    "pass",
    "secret",
    "token",
    "key",
    "auth",
    "cookie",
    "seed",
    "otp",
    "credential",
    "signature",
    "card",
    "cvv",
    "session",
    "pan",
    "eyj",
    "bearer",
    "basic",
    "tg_",
    "-----begin",
)
# ... or a span of 13+ digits, spaces and dashes (a card candidate).
_DIGIT_SPAN: Final = re.compile(r"[0-9][0-9 -]{11,}[0-9]")
# Log lines repeat the same short strings (method names, peers, codes, logger names): results are
# remembered, in a cache that belongs to one set of registered secrets (see _Registered).
_CACHE_SIZE: Final = 2048
_CACHE_MAX_LEN: Final = 256
_DIGIT_RUN: Final = re.compile(r"[0-9]+")


# Exact registered secrets, longest first, in one alternation; a separate first pass, so that no other
# pattern's match can swallow the start of a registered secret.
class _Registered:
    # (pattern of the registered secrets, result cache made with it): replaced as one object on every
    # change, so that a scan racing with register_secret() can never store a result in the new cache.
    state: tuple[re.Pattern[str] | None, dict[str, str]] = (None, {})


def _compile_registered() -> None:
    ordered = sorted(_registered, key=lambda s: (-len(s), s))
    pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
    _Registered.state = (pattern, {})


def generation() -> object:
    """A token that changes whenever the registered secrets change (compare by identity): a cache of answers that
    depend on them (the audit service's masking) is valid while it stays the same object."""
    return _Registered.state


def register_secret(value: str) -> None:
    """Mask every occurrence of ``value`` in every logged string from now on.

    Values shorter than 8 characters are ignored.
    """
    if not isinstance(value, str) or len(value) < MIN_REGISTERED_SECRET_LENGTH:
        return
    with _lock:
        if value in _registered:
            return
        _registered.add(value)
        _compile_registered()


def forget_secret(value: str) -> None:
    """Stop masking a secret registered with :func:`register_secret` (no-op when it is unknown)."""
    with _lock:
        if value not in _registered:
            return
        _registered.discard(value)
        _compile_registered()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_card(text: str, glued: bool) -> str:
    """Mask each Luhn-valid 13-19 digit card number (issuer ranges 2-6) made of whole digit groups.

    ``glued``: the first group continues a word or a decimal number, so it cannot start a card.
    """
    groups = [m.span() for m in _DIGIT_RUN.finditer(text)]
    if glued:
        groups = groups[1:]
    n = len(groups)
    pieces: list[str] = []
    last = 0
    i = 0
    while i < n:
        found = -1
        if "2" <= text[groups[i][0]] <= "6":
            digits = ""
            for j in range(i, n):
                digits += text[groups[j][0] : groups[j][1]]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and _luhn_ok(digits):
                    found = j
        if found < 0:
            i += 1
            continue
        pieces.append(text[last : groups[i][0]])
        pieces.append(REDACTED)
        last = groups[found][1]
        i = found + 1
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def _glued(m: re.Match[str], extra: str = "") -> bool:
    """True when the match continues a word (or a number, with extra=".") instead of starting one."""
    start = m.start()
    if start == 0:
        return False
    before = m.string[start - 1]
    return before.isalnum() or before in extra


def _replace(m: re.Match[str]) -> str:
    kind = m.lastgroup
    if kind == "hdrval":
        return m.group("hdr") + REDACTED
    if kind == "kvval":
        key = m.group("kv")
        if key[:3].lower() == "pan" and _glued(m):  # "span=", "company:" are not card PANs
            return key + redact_text(m.group("kvval"))
        return key + REDACTED
    if kind == "authval":
        if _glued(m):  # "nonbasic approach"
            return m.group("auth") + redact_text(m.group("authval"))
        return m.group("auth") + REDACTED
    if kind == "card":
        return _mask_card(m.group(0), _glued(m, "."))
    return REDACTED


def _scan(text: str, registered: re.Pattern[str] | None) -> str:
    if registered is not None:
        text = registered.sub(REDACTED, text)
    # Fast path: the regular expression engine costs ~0.1-0.25 us per character, while a few substring
    # tests cost ~1 us per string. Every static pattern needs one of these needles (or a digit run).
    folded = text.casefold()
    for needle in _NEEDLES:
        if needle in folded:
            return _master.sub(_replace, text)
    if _DIGIT_SPAN.search(text) is not None:
        return _master.sub(_replace, text)
    return text


def redact_text(text: str) -> str:
    """Mask every secret found in ``text``."""
    registered, cache = _Registered.state
    if len(text) > _CACHE_MAX_LEN:
        return _scan(text, registered)
    cached = cache.get(text)
    if cached is None:
        cached = _scan(text, registered)
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[text] = cached
    return cached


def is_sensitive_key(key: object) -> bool:
    """True when a mapping key names a secret (``Password``, ``x-api-key``, ``card_pan``, ``sessionId``)."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    elif not isinstance(key, str):
        return False
    cached = _key_cache.get(key)
    if cached is not None:
        return cached
    norm = key.lower().replace("-", "_")
    result = any(word in norm for word in _SENSITIVE_KEY_WORDS) or not _SENSITIVE_KEY_PARTS.isdisjoint(
        norm.split("_")
    )
    if len(_key_cache) < 4096:
        _key_cache[key] = result
    return result


_key_cache: dict[str, bool] = {}

_SAFE_SCALARS: Final = (int, float, bool, type(None))


def _redact(value: object, depth: int) -> object:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, _SAFE_SCALARS):
        return value
    if depth >= _MAX_DEPTH:
        return redact_text(repr(value))
    if isinstance(value, dict):
        return {k: (REDACTED if is_sensitive_key(k) else _redact(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) == 2 and isinstance(value[0], str) and is_sensitive_key(value[0]):
            # a (key, value) pair, as in gRPC metadata or HTTP headers: ("x-api-key", "…")
            pair = [redact_text(value[0]), REDACTED]
            return pair if isinstance(value, list) else tuple(pair)
        redacted = [_redact(v, depth + 1) for v in value]
        return redacted if isinstance(value, list) else tuple(redacted)
    if isinstance(value, set | frozenset):
        items = {_redact(v, depth + 1) for v in value}
        return frozenset(items) if isinstance(value, frozenset) else items
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "backslashreplace")
        masked = redact_text(text)
        return value if masked == text else masked
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {redact_text(str(value))}"
    # Anything else is rendered later through repr()/str(): check that text now.
    text = repr(value)
    masked = redact_text(text)
    return value if masked == text else masked


def redact(value: object) -> object:
    """Return ``value`` with every secret masked, recursively (dicts, lists, tuples, sets, bytes...)."""
    return _redact(value, 0)


def redact_processor(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: redact every field except the timestamp and the level (in place); a field whose
    value is a :class:`Trusted` string is checked by key only."""
    for key, value in event_dict.items():
        if key in _PASSTHROUGH_KEYS:
            continue
        if is_sensitive_key(key):
            event_dict[key] = REDACTED
        elif type(value) is str:
            event_dict[key] = redact_text(value)
        elif type(value) is Trusted:
            continue
        elif not isinstance(value, _SAFE_SCALARS):
            event_dict[key] = _redact(value, 0)
    return event_dict
