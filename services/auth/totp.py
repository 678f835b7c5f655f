"""TOTP (RFC 6238) over pyotp's HOTP (RFC 4226): seeds, codes, verification within ±1 step, otpauth:// URIs.

The service's TOTP is HMAC-SHA-1, 6 digits, 30-second steps from the Unix epoch (what every authenticator app
reads from an otpauth:// URI without asking); `Totp` takes other digests, digit counts and steps for the RFC's
test vectors. A seed is 20 random bytes (160 bits, RFC 4226 section 4's recommendation).

`verify` answers which time step a code matched (the current one, or one step either side for clock drift), or
None. It compares the code with all three candidates in constant time and does not remember anything: the caller
accepts the match only through `HotState.advance_totp_step(user, step)`, which admits each step once and never an
older step after a newer one, across replicas sharing the hot state. A code must be exactly the digits (ASCII
0-9, no spaces: the client strips them); anything else never matches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import pyotp

__all__ = ["ISSUER", "SEED_BYTES", "TOTP", "Totp", "hotp", "new_seed", "provisioning_uri"]

ISSUER: Final = "Tradeguard"
SEED_BYTES: Final = 20
DIGEST_NAMES: Final = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def _base32(seed: bytes) -> str:
    return base64.b32encode(seed).decode("ascii").rstrip("=")


def new_seed(random: Callable[[int], bytes]) -> bytes:
    """A fresh seed of `SEED_BYTES` random bytes."""
    seed = random(SEED_BYTES)
    if len(seed) != SEED_BYTES:
        raise ValueError("the random source returned the wrong number of bytes")
    return seed


def hotp(seed: bytes, counter: int, digits: int = 6, digest: str = "sha1") -> str:
    """RFC 4226 HOTP value of `counter` (pyotp's generator), `digits` long, zero-padded."""
    return pyotp.HOTP(_base32(seed), digits=digits, digest=DIGEST_NAMES[digest]).at(counter)


@dataclass(frozen=True, slots=True)
class Totp:
    """RFC 6238 with one digest, digit count and step length (T0 = 0)."""

    digits: int = 6
    step_s: int = 30
    digest: str = "sha1"
    window: int = 1  # steps accepted either side of the current one
    issuer: str = ISSUER  # what authenticator apps show

    @property
    def replay_ttl_us(self) -> int:
        """How long the last accepted step must be remembered: until no code of it or before can match."""
        return (2 * self.window + 2) * self.step_s * 1_000_000

    def step_at(self, now_us: int) -> int:
        """The time step (RFC 6238's T) at `now_us` microseconds since the epoch."""
        return now_us // (self.step_s * 1_000_000)

    def code(self, seed: bytes, step: int) -> str:
        return hotp(seed, step, self.digits, self.digest)

    def code_at(self, seed: bytes, now_us: int) -> str:
        return self.code(seed, self.step_at(now_us))

    def verify(self, seed: bytes, code: str, now_us: int) -> int | None:
        """The step within ±`window` of `now_us`'s whose code is `code`, or None. Every candidate is
        compared (constant time, no early exit)."""
        if len(code) != self.digits or not (code.isascii() and code.isdigit()):
            return None
        current = self.step_at(now_us)
        given = code.encode("ascii")
        matched: int | None = None
        for step in range(current - self.window, current + self.window + 1):
            if step < 0:
                continue
            if hmac.compare_digest(self.code(seed, step).encode("ascii"), given) and matched is None:
                matched = step
        return matched

    def uri(self, seed: bytes, username: str) -> str:
        """otpauth://totp/<issuer>:<username>?secret=<base32>&issuer=<issuer> (+ algorithm, digits, period
        when they are not the defaults). It holds the seed: show it once, never log it."""
        totp = pyotp.TOTP(
            _base32(seed), digits=self.digits, digest=DIGEST_NAMES[self.digest], interval=self.step_s
        )
        return totp.provisioning_uri(name=username, issuer_name=self.issuer)


TOTP: Final = Totp()


def provisioning_uri(seed: bytes, username: str) -> str:
    """The service's otpauth:// URI for `seed` (SHA-1, 6 digits, 30 s)."""
    return TOTP.uri(seed, username)
