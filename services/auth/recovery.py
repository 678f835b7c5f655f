"""One-time recovery codes: a second factor for a user who lost their authenticator.

`COUNT` codes are made at TOTP enrolment and shown once; each is 80 random bits written as 16 characters of
Crockford's base32 in four groups ("7k2m-q9xd-..."). Only their SHA-256 (lowercase hex, of the normalised code) is
stored, and `AuthStore.use_recovery_code` spends one for exactly one caller.

Why a fast hash is enough here: unlike a password, a code is not chosen by a person: it has 80 bits of entropy, so
even with the stored digests in hand, finding one code takes about 2^79 SHA-256 evaluations (at 10^10 a second,
millions of years). A slow password hash buys nothing against that and would cost ~20 ms of CPU per attempt;
online guessing is throttled by the lockout like every other factor.

Typing is forgiving: case, spaces and hyphens are ignored, and the letters Crockford's alphabet leaves out are
read as the digits they look like (i, l → 1; o → 0).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

__all__ = ["CODE_BYTES", "COUNT", "generate_codes", "hash_code", "normalize_code", "stored_hash"]

COUNT: Final = 10
CODE_BYTES: Final = 10  # 80 bits → 16 base32 characters
_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base32, lowercase
_READ_AS: Final = str.maketrans({"i": "1", "l": "1", "o": "0", "-": None, " ": None})
_CODE_LENGTH: Final = CODE_BYTES * 8 // 5


def _encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    chars = [_ALPHABET[(number >> shift) & 31] for shift in range(5 * (_CODE_LENGTH - 1), -1, -5)]
    text = "".join(chars)
    return "-".join(text[i : i + 4] for i in range(0, _CODE_LENGTH, 4))


def generate_codes(random: Callable[[int], bytes], count: int = COUNT) -> list[str]:
    """`count` distinct fresh codes, as shown to the user."""
    codes: list[str] = []
    while len(codes) < count:
        raw = random(CODE_BYTES)
        if len(raw) != CODE_BYTES:
            raise ValueError("the random source returned the wrong number of bytes")
        code = _encode(raw)
        if code not in codes:
            codes.append(code)
    return codes


def normalize_code(code: str) -> str | None:
    """The canonical form of a typed code (16 alphabet characters), or None when it cannot be one."""
    if len(code) > 64:
        return None
    text = code.lower().translate(_READ_AS)
    if len(text) != _CODE_LENGTH or any(char not in _ALPHABET for char in text):
        return None
    return text


def hash_code(code: str) -> str | None:
    """Lowercase hex SHA-256 of the normalised code (what is stored), or None for a malformed one."""
    normalized = normalize_code(code)
    if normalized is None:
        return None
    return hashlib.sha256(normalized.encode("ascii")).hexdigest()


def stored_hash(code: str) -> str:
    """`hash_code` of a code this module generated (ValueError for anything else)."""
    digest = hash_code(code)
    if digest is None:
        raise ValueError("not a recovery code")
    return digest
