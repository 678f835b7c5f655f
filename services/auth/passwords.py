"""Passwords: the policy a new password must meet, and Argon2id hashing and verification off the event loop.

Policy (NIST SP 800-63B, 5.1.1.2): after NFKC normalisation a password is 12 to 256 characters; any characters,
spaces and Unicode included; no composition rules. Refused: a password based on the username (what remains after
removing the username, case-folded, is shorter than the minimum), one character repeated, a run of consecutive
characters ("123456789012", "abcdefghijkl"), and the few very common long passwords in `_COMMON`.

Hashing: Argon2id, m = 19 MiB, t = 2, p = 1 (OWASP), 16-byte salt, 32-byte tag, as a PHC string; about 20-30 ms of
CPU, so `hash` and `verify` run in a worker thread (`asyncio.to_thread`; argon2-cffi releases the GIL) and never
block the event loop. `verify(None, password)` verifies against `DUMMY_HASH`, a constant hash with the very same
parameters, and returns False: a login for an unknown user costs what one for a known user costs.

What is hashed is the NFKC normalisation of the password as UTF-8 (the same text typed on another keyboard or
system verifies). A candidate longer than `MAX_RAW_LENGTH` characters is not normalised (bounded work) and never
verifies, but the hash is run all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import unicodedata
from collections.abc import Callable
from typing import Final

from argon2 import PasswordHasher, Type, exceptions

from tradeguard.errors import InvalidArgument

__all__ = [
    "DUMMY_HASH",
    "MAX_LENGTH",
    "MAX_RAW_LENGTH",
    "MIN_LENGTH",
    "Passwords",
    "check_password_policy",
    "new_hasher",
    "normalize_password",
]

MIN_LENGTH: Final = 12
MAX_LENGTH: Final = 256
MAX_RAW_LENGTH: Final = (
    4 * MAX_LENGTH
)  # before normalisation: NFKC may grow a string, never past this bound here

TIME_COST: Final = 2
MEMORY_COST_KIB: Final = 19 * 1024
PARALLELISM: Final = 1

# A constant Argon2id hash with the parameters above, of a random value nobody kept: verified against for unknown
# users so that they cost the same as known ones (tests check its parameters match `new_hasher()`'s).
DUMMY_HASH: Final = (
    "$argon2id$v=19$m=19456,t=2,p=1$tRxBTa045nUZ8qLufCiRHg$w3FFjx5mq3qcqdCsjh9OFMAk/ljo4s+Qzm2JyGlButM"
)

# The most common passwords of 12 characters or more in public breach lists (NIST asks for a blocklist; a long
# list belongs in a file the operator can extend, this one catches the obvious). Compared case-folded.
_COMMON: Final = frozenset(
    {
        "password1234",
        "password12345",
        "password123456",
        "passwordpassword",
        "qwertyuiopasdf",
        "qwertyuiop123",
        "qwerty123456",
        "1q2w3e4r5t6y",
        "1qaz2wsx3edc",
        "zaq12wsxcde3",
        "iloveyou1234",
        "123456789qwerty",
        "qwerty123456789",
        "letmein12345",
        "administrator",
        "administrator1",
        "welcome12345",
        "changeme1234",
        "tradeguard123",
        "tradeguard1234",
    }
)


def new_hasher() -> PasswordHasher:
    """argon2-cffi's hasher with this service's parameters."""
    return PasswordHasher(
        time_cost=TIME_COST,
        memory_cost=MEMORY_COST_KIB,
        parallelism=PARALLELISM,
        hash_len=32,
        salt_len=16,
        type=Type.ID,
    )


def normalize_password(password: str) -> str:
    """The NFKC normalisation of `password` (what is hashed and what the policy measures)."""
    return unicodedata.normalize("NFKC", password)


def _step(a: str, b: str) -> int:
    """From one character to the next, in code points; between digits, around the dial ("9" → "0" is +1)."""
    if a.isdecimal() and b.isdecimal() and a.isascii() and b.isascii():
        step = (ord(b) - ord(a)) % 10
        return -1 if step == 9 else step
    return ord(b) - ord(a)


def _is_run(text: str) -> bool:
    """One character repeated, or consecutive characters up or down ("abcd…", "9876…", "1234567890123")."""
    steps = {_step(a, b) for a, b in itertools.pairwise(text)}
    return len(steps) <= 1 and steps <= {-1, 0, 1}


def check_password_policy(password: str, username: str, field: str = "password") -> str:
    """The normalised password if it may be set for `username`; else InvalidArgument naming `field` (the
    description says which rule, never the password)."""
    if len(password) > MAX_RAW_LENGTH:
        raise InvalidArgument.field(field, f"must be at most {MAX_LENGTH} characters")
    normalized = normalize_password(password)
    if len(normalized) < MIN_LENGTH:
        raise InvalidArgument.field(field, f"must be at least {MIN_LENGTH} characters")
    if len(normalized) > MAX_LENGTH:
        raise InvalidArgument.field(field, f"must be at most {MAX_LENGTH} characters")
    folded = normalized.casefold()
    name = unicodedata.normalize("NFKC", username).casefold()
    if name and len(folded.replace(name, "")) < MIN_LENGTH:
        raise InvalidArgument.field(field, "must not be based on the username")
    if _is_run(folded):
        raise InvalidArgument.field(
            field, "must not be one character repeated or a run of consecutive characters"
        )
    if folded in _COMMON:
        raise InvalidArgument.field(field, "is a commonly used password")
    return normalized


class Passwords:
    """Argon2id hashing and verification in a worker thread; `verify` always runs one Argon2id verification."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self._hasher = hasher or new_hasher()

    async def hash(self, password: str) -> str:
        """The PHC string of the normalised `password` (call `check_password_policy` first)."""
        normalized = normalize_password(password)
        return await asyncio.to_thread(self._hasher.hash, normalized)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether `password` matches `password_hash`. With None (unknown user), or a password too long to
        be one, or a stored hash that does not parse, the Argon2id verification is run against `DUMMY_HASH`
        (same cost) and the answer is False."""
        candidate = normalize_password(password) if len(password) <= MAX_RAW_LENGTH else None
        target = password_hash if password_hash is not None and candidate is not None else None
        return await asyncio.to_thread(self._verify_sync, target, candidate or "")

    def _verify_sync(self, password_hash: str | None, candidate: str) -> bool:
        if password_hash is not None:
            try:
                return self._hasher.verify(password_hash, candidate)
            except exceptions.VerifyMismatchError:
                return False
            except (exceptions.InvalidHashError, exceptions.VerificationError):
                pass  # a stored hash that does not verify as Argon2id: cost as the dummy, refuse
        _dummy_verify(self._hasher.verify, candidate)
        return False

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the stored hash was made with other parameters than today's (rehash after a good login)."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except exceptions.InvalidHashError:
            return True


def _dummy_verify(verify: Callable[[str, str], bool], candidate: str) -> None:
    with contextlib.suppress(exceptions.VerificationError):
        verify(DUMMY_HASH, candidate)
