"""Signed API-key requests: the wire format every client and the auth service agree on (issue 7, DESIGN.md).

Pure: no grpc, no I/O. Randomness is injected (`Random`: n -> n random bytes, `os.urandom` in production).

A signed call carries four metadata entries (gRPC) or headers (HTTP):

    x-tg-key        the API key id: "tgk_" + 32 base62 characters + 6 base62 characters of CRC32 (GitHub's scheme)
    x-tg-timestamp  Unix milliseconds, decimal, no sign, no leading zeros
    x-tg-nonce      16-64 characters of [A-Za-z0-9_-], never reused within the window
    x-tg-signature  lowercase hex: 64 characters (HMAC-SHA256) or 128 (Ed25519)

The signed string is six lines joined by "\\n", with no trailing newline:

    TG1-HMAC-SHA256 (or TG1-ED25519)
    <key id>
    <timestamp>
    <nonce>
    <path>            gRPC: the full method "/pkg.Service/Method"; HTTP: the request path with its query string
    <body digest>     lowercase hex SHA-256 of the raw body bytes as sent (an empty body: e3b0c442…b855)

An HMAC signature is HMAC-SHA256 keyed with the secret exactly as shown to the user ("tgs_…"), as UTF-8 bytes.
An Ed25519 signature is the 64-byte RFC 8032 signature of the signed string by the client's private key.

The parsers are strict (a value with anything extra is refused, never normalised) and raise `MalformedRequest`
naming the field, never echoing the value. Verification is constant-time for HMAC (`hmac.compare_digest`).

This module is the one place in the kit, besides the mesh's PKI and TLS, allowed `cryptography.hazmat`: the
Ed25519 primitive for API-key signatures (an authentication primitive, like the PKI's certificate keys).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DEFAULT_FUTURE_MS",
    "DEFAULT_WINDOW_MS",
    "EMPTY_BODY_SHA256",
    "HEADER_KEY",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "KEY_ID_PREFIX",
    "MAX_FUTURE_MS",
    "MAX_WINDOW_MS",
    "SECRET_PREFIX",
    "Ed25519PrivateKey",
    "MalformedRequest",
    "Random",
    "Scheme",
    "SignedRequest",
    "Window",
    "body_digest",
    "canonical_string",
    "check_ed25519_public_key",
    "check_window",
    "ed25519_private_key",
    "ed25519_public_key",
    "ed25519_public_key_from_pem",
    "ed25519_seed_from_pem",
    "hmac_secret_valid",
    "key_id_valid",
    "new_hmac_secret",
    "new_key_id",
    "new_nonce",
    "parse_body_digest",
    "parse_key_id",
    "parse_nonce",
    "parse_signature",
    "parse_timestamp",
    "sign_ed25519",
    "sign_hmac",
    "signed_headers",
    "verify_ed25519",
    "verify_hmac",
]

Random = Callable[[int], bytes]

HEADER_KEY: Final = "x-tg-key"
HEADER_TIMESTAMP: Final = "x-tg-timestamp"
HEADER_NONCE: Final = "x-tg-nonce"
HEADER_SIGNATURE: Final = "x-tg-signature"

KEY_ID_PREFIX: Final = "tgk_"
SECRET_PREFIX: Final = "tgs_"  # noqa: S105 - a prefix, not a secret
KEY_ID_BODY_LEN: Final = 32  # base62 characters of randomness (~190 bits)
KEY_ID_CHECKSUM_LEN: Final = 6  # base62 characters of CRC32 (62**6 > 2**32)
SECRET_BODY_LEN: Final = 43  # base62 characters of randomness (~256 bits)

DEFAULT_WINDOW_MS: Final = 5_000
MAX_WINDOW_MS: Final = 60_000
DEFAULT_FUTURE_MS: Final = 1_000
MAX_FUTURE_MS: Final = 1_000

EMPTY_BODY_SHA256: Final = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET: Final = frozenset(BASE62)

_TIMESTAMP = re.compile(r"[1-9][0-9]{0,15}")  # 16 digits: milliseconds until the year 318857
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"tgk_[0-9A-Za-z]{38}")
_SECRET = re.compile(r"tgs_[0-9A-Za-z]{43}")


class Scheme(enum.StrEnum):
    """The first line of the signed string; the key's kind decides which one a request must use."""

    HMAC_SHA256 = "TG1-HMAC-SHA256"
    ED25519 = "TG1-ED25519"

    @property
    def signature_hex_len(self) -> int:
        return 64 if self is Scheme.HMAC_SHA256 else 128


class MalformedRequest(ValueError):
    """A signed-request field that is not in its exact format; `field` names it (the value is never repeated)."""

    def __init__(self, field: str, problem: str = "malformed") -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a guard (or the HTTP edge) saw of one signed call, every field as sent (the verifier parses them).

    `body_sha256` is computed by the receiver over the raw body bytes as received (never sent by the client);
    `source_ip` is the caller's address as the receiver saw it; `required_permission` is what the method needs
    ("" for none)."""

    key_id: str
    timestamp: str
    nonce: str
    signature: str
    path: str
    body_sha256: str
    source_ip: str
    required_permission: str = ""

    def __repr__(self) -> str:  # the signature is no secret, but it has no place in logs either
        return (
            f"SignedRequest(key_id={self.key_id!r}, timestamp={self.timestamp!r}, path={self.path!r}, "
            f"source_ip={self.source_ip!r}, required_permission={self.required_permission!r})"
        )


# --- the signed string ---------------------------------------------------------------------------------------


def body_digest(raw: bytes) -> str:
    """Lowercase hex SHA-256 of the raw body bytes (the last line of the signed string)."""
    return hashlib.sha256(raw).hexdigest()


def canonical_string(  # noqa: PLR0917 - the fields in their signed order
    scheme: Scheme | str, key_id: str, timestamp: int | str, nonce: str, path: str, body_sha256: str
) -> bytes:
    """The six lines joined by "\\n", no trailing newline, UTF-8. A field holding a line break (which would
    let two different requests share a signed string) or an unknown scheme raises `MalformedRequest`.

    A timestamp given as an int is written in decimal; as a str it is used as sent (the verifier parsed it)."""
    scheme = _scheme(scheme)
    if isinstance(timestamp, int):
        if timestamp < 0:
            raise MalformedRequest(HEADER_TIMESTAMP, "negative")
        timestamp = str(timestamp)
    fields = (key_id, timestamp, nonce, path, body_sha256)
    for name, value in zip(
        (HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, "path", "body_sha256"), fields, strict=True
    ):
        if "\n" in value or "\r" in value:
            raise MalformedRequest(name, "contains a line break")
    return "\n".join((scheme.value, *fields)).encode("utf-8")


def _scheme(scheme: Scheme | str) -> Scheme:
    try:
        return Scheme(scheme)
    except ValueError:
        raise MalformedRequest("scheme", "unknown") from None


# --- signing and verification ----------------------------------------------------------------------------------


def sign_hmac(  # noqa: PLR0917 - the fields in their signed order
    secret: str, key_id: str, timestamp: int | str, nonce: str, path: str, body_sha256: str
) -> str:
    """TG1-HMAC-SHA256: lowercase hex HMAC-SHA256 of the signed string, keyed with the secret's UTF-8 bytes."""
    message = canonical_string(Scheme.HMAC_SHA256, key_id, timestamp, nonce, path, body_sha256)
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_hmac(  # noqa: PLR0917 - the fields in their signed order
    secret: str, signature: str, key_id: str, timestamp: int | str, nonce: str, path: str, body_sha256: str
) -> bool:
    """Whether `signature` is the TG1-HMAC-SHA256 signature of the request (constant-time comparison)."""
    expected = sign_hmac(secret, key_id, timestamp, nonce, path, body_sha256)
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "surrogatepass"))


def sign_ed25519(  # noqa: PLR0917 - the fields in their signed order
    private_key: Ed25519PrivateKey | bytes,
    key_id: str,
    timestamp: int | str,
    nonce: str,
    path: str,
    body_sha256: str,
) -> str:
    """TG1-ED25519: lowercase hex of the 64-byte signature of the signed string. `private_key` is a key object or
    its raw 32-byte seed (RFC 8032)."""
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else _private_key(private_key)
    message = canonical_string(Scheme.ED25519, key_id, timestamp, nonce, path, body_sha256)
    return key.sign(message).hex()


def verify_ed25519(  # noqa: PLR0917 - the fields in their signed order
    public_key: bytes,
    signature: str,
    key_id: str,
    timestamp: int | str,
    nonce: str,
    path: str,
    body_sha256: str,
) -> bool:
    """Whether `signature` (128 lowercase hex characters) is the TG1-ED25519 signature of the request by the
    raw 32-byte `public_key`. Anything malformed is False, never an exception."""
    if len(public_key) != 32 or _SIGNATURE_ED25519.fullmatch(signature) is None:
        return False
    try:
        message = canonical_string(Scheme.ED25519, key_id, timestamp, nonce, path, body_sha256)
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def ed25519_public_key(private_key: Ed25519PrivateKey | bytes) -> bytes:
    """The raw 32-byte public key of a private key (object or 32-byte seed): what a client registers."""
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else _private_key(private_key)
    return key.public_key().public_bytes_raw()


def check_ed25519_public_key(raw: bytes) -> bytes:
    """`raw` if it is a usable 32-byte Ed25519 public key; `MalformedRequest("public_key")` otherwise."""
    if len(raw) != 32:
        raise MalformedRequest("public_key", "must be 32 bytes")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise MalformedRequest("public_key", "not an Ed25519 public key") from None
    return raw


def ed25519_seed_from_pem(pem: bytes) -> bytes:
    """The 32-byte seed of an unencrypted PEM PKCS#8 Ed25519 private key, as `openssl genpkey -algorithm ed25519`
    writes it. ValueError (never naming the content) for anything else."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key.private_bytes_raw()


def ed25519_public_key_from_pem(pem: bytes) -> bytes:
    """The raw 32-byte public key of a PEM Ed25519 public key (`openssl pkey -pubout`). ValueError otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a PEM Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key.public_bytes_raw()


def ed25519_private_key(seed: bytes) -> Ed25519PrivateKey:
    """The private key of a raw 32-byte seed (RFC 8032), for a client that signs many calls: loading a seed
    derives its public key, about half the CPU of signing with the seed each time. ValueError unless 32 bytes."""
    return _private_key(seed)


def _private_key(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != 32:
        raise ValueError("an Ed25519 private key seed is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def signed_headers(  # noqa: PLR0917 - the fields in their signed order
    scheme: Scheme | str,
    credential: str | Ed25519PrivateKey | bytes,
    key_id: str,
    timestamp_ms: int,
    nonce: str,
    path: str,
    body: bytes,
) -> tuple[tuple[str, str], ...]:
    """The four (name, value) metadata entries of a signed call: what a client interceptor sends. `credential` is
    the HMAC secret ("tgs_…") for TG1-HMAC-SHA256, the private key (object or seed) for TG1-ED25519."""
    scheme = _scheme(scheme)
    digest = body_digest(body)
    if scheme is Scheme.HMAC_SHA256:
        if not isinstance(credential, str):
            raise TypeError("TG1-HMAC-SHA256 signs with the secret string")
        signature = sign_hmac(credential, key_id, timestamp_ms, nonce, path, digest)
    else:
        if isinstance(credential, str):
            raise TypeError("TG1-ED25519 signs with an Ed25519 private key")
        signature = sign_ed25519(credential, key_id, timestamp_ms, nonce, path, digest)
    return (
        (HEADER_KEY, key_id),
        (HEADER_TIMESTAMP, str(timestamp_ms)),
        (HEADER_NONCE, nonce),
        (HEADER_SIGNATURE, signature),
    )


# --- strict parsers --------------------------------------------------------------------------------------------

_SIGNATURE_HMAC = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_ED25519 = re.compile(r"[0-9a-f]{128}")


def parse_timestamp(text: str) -> int:
    """Unix milliseconds: decimal ASCII digits, no sign, no leading zero, no spaces, at most 16 digits."""
    if _TIMESTAMP.fullmatch(text) is None:
        raise MalformedRequest(HEADER_TIMESTAMP)
    return int(text)


def parse_nonce(text: str) -> str:
    """16-64 characters of [A-Za-z0-9_-]."""
    if _NONCE.fullmatch(text) is None:
        raise MalformedRequest(HEADER_NONCE)
    return text


def parse_signature(text: str, scheme: Scheme | str) -> str:
    """Lowercase hex of the scheme's length: 64 characters (HMAC-SHA256) or 128 (Ed25519)."""
    pattern = _SIGNATURE_HMAC if _scheme(scheme) is Scheme.HMAC_SHA256 else _SIGNATURE_ED25519
    if pattern.fullmatch(text) is None:
        raise MalformedRequest(HEADER_SIGNATURE)
    return text


def parse_body_digest(text: str) -> str:
    """64 lowercase hex characters."""
    if _DIGEST.fullmatch(text) is None:
        raise MalformedRequest("body_sha256")
    return text


def parse_key_id(text: str) -> str:
    """A key id in its format with a matching checksum; checked offline, before any lookup."""
    if not key_id_valid(text):
        raise MalformedRequest(HEADER_KEY)
    return text


# --- key ids and secrets ---------------------------------------------------------------------------------------


def _base62_fixed(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        digits.append(BASE62[digit])
    if value:
        raise ValueError("value too large for its width")
    return "".join(reversed(digits))


def _checksum(prefix_and_body: str) -> str:
    return _base62_fixed(zlib.crc32(prefix_and_body.encode("ascii")), KEY_ID_CHECKSUM_LEN)


def _random_base62(random: Random, length: int) -> str:
    """`length` uniformly random base62 characters (rejection sampling: bytes >= 248 are dropped)."""
    out: list[str] = []
    while len(out) < length:
        for byte in random(length - len(out) + 8):
            if byte < 248:  # 248 = 4 * 62: no bias
                out.append(BASE62[byte % 62])
                if len(out) == length:
                    break
    return "".join(out)


def new_key_id(random: Random) -> str:
    """A fresh key id: "tgk_" + 32 random base62 characters + 6 base62 characters of CRC32(prefix + body)."""
    head = KEY_ID_PREFIX + _random_base62(random, KEY_ID_BODY_LEN)
    return head + _checksum(head)


def key_id_valid(text: str) -> bool:
    """Whether `text` has the key id format and its checksum matches (no lookup: a scanner can run this)."""
    if _KEY_ID.fullmatch(text) is None:
        return False
    head, checksum = text[:-KEY_ID_CHECKSUM_LEN], text[-KEY_ID_CHECKSUM_LEN:]
    return hmac.compare_digest(_checksum(head), checksum)


def new_hmac_secret(random: Random) -> str:
    """A fresh HMAC secret: "tgs_" + 43 random base62 characters (~256 bits), shown to its owner once."""
    return SECRET_PREFIX + _random_base62(random, SECRET_BODY_LEN)


def hmac_secret_valid(text: str) -> bool:
    """Whether `text` has the secret format (a decrypted secret is checked before use)."""
    return _SECRET.fullmatch(text) is not None


def new_nonce(random: Random) -> str:
    """A fresh 32-character nonce for a client (base62, ~190 bits)."""
    return _random_base62(random, 32)


# --- the time window -------------------------------------------------------------------------------------------


class Window(enum.Enum):
    OK = "ok"
    STALE = "stale"  # older than the window
    FUTURE = "future"  # further in the future than allowed


def check_window(timestamp_ms: int, now_ms: int, window_ms: int, future_ms: int) -> Window:
    """Where `timestamp_ms` is against `now_ms`: STALE if more than `window_ms` old, FUTURE if more than
    `future_ms` ahead, OK otherwise (both bounds inclusive). `window_ms` must be in 1..60,000 and `future_ms` in
    0..1,000 (ValueError otherwise): a configuration cannot widen the replay window beyond the standard's."""
    if not 0 < window_ms <= MAX_WINDOW_MS:
        raise ValueError(f"window_ms must be in 1..{MAX_WINDOW_MS}")
    if not 0 <= future_ms <= MAX_FUTURE_MS:
        raise ValueError(f"future_ms must be in 0..{MAX_FUTURE_MS}")
    if timestamp_ms > now_ms + future_ms:
        return Window.FUTURE
    if timestamp_ms < now_ms - window_ms:
        return Window.STALE
    return Window.OK
