"""Revocations pushed to the guard: what it checks on every call without a lookup, and the stream that feeds it.

`RevocationSet` holds what the auth service revoked (one access token by `jti`, a refresh-token family, every
token of a user issued at or before an instant, an API key), each until its expiry (after which what it revoked
has expired anyway). Checks are dictionary lookups. Bounded: at most `max_entries` live entries (default 100,000,
about 20 MB). When a revocation arrives while the set is full of live entries, it is not stored and the set FAILS
CLOSED instead: every token is refused until that revocation's own expiry has passed (by then what it revoked no
longer verifies anyway). Forgetting a revocation is never an option.

`RevocationWatcher` feeds the set from the auth service's `WatchRevocations` server stream: it resumes from the
sequence after the last one it applied whenever the stream ends or breaks, reconnecting with capped exponential
backoff (0.05 s doubling to 2 s, with jitter; reset once a stream is up). A response without a `revoked` field is
a heartbeat (the stream is up, nothing new). The stream counts as up once the server sent its initial metadata or
a message; a stream silent for `idle_timeout_s` (default 15 s: three of the auth service's 5 s heartbeats) is taken
as broken (a hung server or a dead link) and reopened.

Fail-closed rule for verified JWTs (`RevocationSet.unusable()`), stated once here and applied by the verifier:

- before the stream has EVER been up, no JWT is accepted (the guard cannot know what was revoked);
- while the stream is down, JWTs are still accepted for at most `max_outage_s` (default 5 s, at most 60 s) after it
  went down — an auth restart or a network blip must not stop trading, and a revocation made meanwhile takes effect
  at most that late — then refused until the stream is up again;
- while the set has overflowed (above), every JWT is refused.

Signed API-key calls do not depend on the stream: the auth service verifies each one live.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from tradeguard.observability.logging import get_logger

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_OUTAGE_S",
    "Kind",
    "RevocationSet",
    "RevocationStream",
    "RevocationWatcher",
    "Revoked",
]

_log = get_logger("tradeguard.guard.revocations")

DEFAULT_MAX_ENTRIES: Final = 100_000
DEFAULT_MAX_OUTAGE_S: Final = 5.0
MAX_OUTAGE_S: Final = 60.0
BACKOFF_FIRST_S: Final = 0.05
BACKOFF_MAX_S: Final = 2.0
DEFAULT_IDLE_TIMEOUT_S: Final = 15.0  # the auth service sends a heartbeat every 5 s


class Kind(enum.StrEnum):
    JTI = "jti"
    FAMILY = "family"
    USER = "user"
    KEY = "key"


@dataclass(frozen=True, slots=True)
class Revoked:
    """One revocation as the stream delivers it (`kind` None: a heartbeat)."""

    sequence: int
    kind: Kind | None
    value: str = ""
    revoke_time_us: int = 0  # for USER and FAMILY: tokens issued at or before this instant are revoked
    expire_time_us: int = 0  # after this it no longer matters


class RevocationSet:
    """The revocations a guard knows of, with the state of the stream that feeds it (see the module)."""

    def __init__(
        self,
        clock_us: Callable[[], int],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0 <= max_outage_s <= MAX_OUTAGE_S:
            raise ValueError(f"max_outage_s must be in 0..{MAX_OUTAGE_S}")
        self._clock = clock_us
        self.max_entries = max_entries
        self.max_outage_us = round(max_outage_s * 1_000_000)
        self._jti: dict[str, int] = {}  # jti → expire
        self._key: dict[str, int] = {}  # key id → expire
        self._family: dict[str, tuple[int, int]] = {}  # family → (revoke time, expire)
        self._user: dict[str, tuple[int, int]] = {}  # user → (revoke time, expire)
        self._closed_until_us = 0  # overflow: every token refused until then
        self.last_sequence = 0  # the last sequence applied (the stream resumes after it)
        self._ever_up = False
        self._down_since_us: int | None = None  # None: up (or never connected)
        self.applied = 0  # revocations applied (for tests and metrics)

    def __len__(self) -> int:
        return len(self._jti) + len(self._key) + len(self._family) + len(self._user)

    # --- stream state ---------------------------------------------------------------------------------------

    def stream_up(self) -> None:
        self._ever_up = True
        self._down_since_us = None

    def stream_down(self) -> None:
        if self._down_since_us is None:
            self._down_since_us = self._clock()

    @property
    def is_up(self) -> bool:
        return self._ever_up and self._down_since_us is None

    def unusable(self) -> str | None:
        """Why verified tokens may not be trusted right now (the fail-closed rule), or None when they may."""
        now = self._clock()
        if not self._ever_up:
            return "revocation stream never connected"
        down = self._down_since_us
        if down is not None and now - down > self.max_outage_us:
            return "revocation stream down too long"
        if now <= self._closed_until_us:
            return "revocation set overflowed"
        return None

    # --- applying -------------------------------------------------------------------------------------------

    def apply(self, revoked: Revoked) -> None:
        """Apply one revocation (a heartbeat only advances nothing). Sequences at or below the last applied one
        are applied again harmlessly (idempotent), so a replayed stream is safe."""
        self.last_sequence = max(self.last_sequence, revoked.sequence)
        if revoked.kind is None:
            return
        now = self._clock()
        if revoked.expire_time_us <= now:
            return  # what it revoked has expired already
        if len(self) >= self.max_entries and not self._known(revoked):
            self._prune(now)
            if len(self) >= self.max_entries:
                self._closed_until_us = max(self._closed_until_us, revoked.expire_time_us)
                _log.error("revocation_set_full", max_entries=self.max_entries, kind=revoked.kind.value)
                return
        self._store(revoked)
        self.applied += 1

    def _known(self, revoked: Revoked) -> bool:
        kind, value = revoked.kind, revoked.value
        if kind is Kind.JTI:
            return value in self._jti
        if kind is Kind.KEY:
            return value in self._key
        return value in (self._family if kind is Kind.FAMILY else self._user)

    def _store(self, revoked: Revoked) -> None:
        value, expire = revoked.value, revoked.expire_time_us
        if revoked.kind is Kind.JTI:
            self._jti[value] = max(expire, self._jti.get(value, 0))
        elif revoked.kind is Kind.KEY:
            self._key[value] = max(expire, self._key.get(value, 0))
        else:
            table = self._family if revoked.kind is Kind.FAMILY else self._user
            old = table.get(value)
            if old is None:
                table[value] = (revoked.revoke_time_us, expire)
            else:  # the later revocation covers the earlier one
                table[value] = (max(old[0], revoked.revoke_time_us), max(old[1], expire))

    def _prune(self, now: int) -> None:
        for table in (self._jti, self._key):
            for name in [k for k, expire in table.items() if expire <= now]:
                del table[name]
        for pairs in (self._family, self._user):
            for name in [k for k, (_, expire) in pairs.items() if expire <= now]:
                del pairs[name]

    # --- checks (per call) ----------------------------------------------------------------------------------

    def token_revoked(self, jti: str, family: str | None, user_id: str, issued_at_us: int) -> str | None:
        """Why a token (by its jti, refresh family, subject and issue time) is revoked, or None."""
        now = self._clock()
        expire = self._jti.get(jti)
        if expire is not None and expire > now:
            return "token revoked"
        if family is not None:
            entry = self._family.get(family)
            if entry is not None and entry[1] > now and issued_at_us <= entry[0]:
                return "token family revoked"
        entry = self._user.get(user_id)
        if entry is not None and entry[1] > now and issued_at_us <= entry[0]:
            return "user's tokens revoked"
        return None

    def key_revoked(self, key_id: str) -> bool:
        expire = self._key.get(key_id)
        return expire is not None and expire > self._clock()


class RevocationStream(Protocol):
    """Opens the revocation stream from `since_sequence` (inclusive): first the call's readiness (`ready()`,
    which returns once the server answered), then its revocations in order."""

    def open(self, since_sequence: int) -> StreamCall: ...


class StreamCall(Protocol):
    async def ready(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Revoked]: ...

    def cancel(self) -> None: ...


class RevocationWatcher:
    """Keeps a `RevocationSet` fed from a `RevocationStream`, forever (run it as a background task)."""

    def __init__(
        self,
        revocations: RevocationSet,
        stream: RevocationStream,
        *,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        rng: Callable[[], float] = random.random,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.revocations = revocations
        self._stream = stream
        self._idle_s = idle_timeout_s
        self._first, self._max, self._rng = backoff_first_s, backoff_max_s, rng
        self.connects = 0  # streams that came up

    async def run(self) -> None:
        delay = self._first
        while True:
            call = self._stream.open(self.revocations.last_sequence + 1)
            try:
                async with asyncio.timeout(self._idle_s):
                    await call.ready()
                self.revocations.stream_up()
                self.connects += 1
                delay = self._first
                items = aiter(call)
                while True:
                    try:
                        async with asyncio.timeout(self._idle_s):  # silent too long: a hung server or link
                            revoked = await anext(items)
                    except StopAsyncIteration:
                        break
                    self.revocations.stream_up()
                    self.revocations.apply(revoked)
                # the server ended the stream (a restart): resume after a short pause
                self.revocations.stream_down()
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as error:
                call.cancel()
                self.revocations.stream_down()
                _log.warning("revocation_stream_down", error=type(error).__name__, retry_in_s=round(delay, 3))
            await asyncio.sleep(delay * (0.5 + self._rng() / 2))
            delay = min(delay * 2, self._max)
