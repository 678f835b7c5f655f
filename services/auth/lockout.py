"""Lockout: failed attempts counted per (principal, source), per principal and per source, locks with growing
backoff, every failure, lock and unlock logged with its cause.

A principal is a user (`account:<user id>`; a username nobody has maps to a stable pseudo id, so an unknown user
goes through the very same counting as a known one) or an API key (`key:<key id>`). A source is the caller's IP
address; an IPv6 address counts as its /64 (one host usually holds a whole /64), an IPv4-mapped one as its IPv4.

Subjects in the hot state (`HotState.count_failure`, `lock`, `locked_until`):
- `pair:<principal>#<epoch>|<source>`: locked first, at a low threshold (5 failures by default). The epoch (the
  user's or key's record version) moves when an operator unlocks the user, which releases every pair lock of the
  user at once without having to find them;
- `<principal>` itself: locked only at a higher threshold (20 by default, for users and keys alike), and only a
  source's first `pair` failures within the window count towards it: nothing while its pair or address is locked,
  nothing past its pair's threshold. So one address adds at most 5 failures to a user's count per window; locking
  the user takes several distinct sources (and an IPv6 source is a whole /64);
- `ip:<source>`: a source failing against many principals (password spraying) is locked at its own threshold (100).

Growing backoff: at the threshold a subject is locked for `base` (30 s); every further counted failure within the
window (15 min; one can only come after the lock ended: attempts refused while locked are not counted) doubles it,
up to `max` (1 h). The numbers come from the settings (`LockoutPolicy.from_settings`).

A successful authentication clears the pair's failures only: the principal's and the address's counters stand, so
a user logging in cannot wipe what a distributed attacker accumulated against them.

Logs (`tradeguard.observability.logging`, logger "auth.lockout"): `auth.failure` (cause, principal, source and the
counts), `auth.locked` (subject, until, failures), `auth.unlocked` (subject, cause). Never a password, a code or a
token; an unknown username is not logged either (people type passwords into it).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from services.auth.hot import HotState
from tradeguard.observability.logging import get_logger

__all__ = [
    "Lock",
    "Lockout",
    "LockoutPolicy",
    "LockoutSettingsView",
    "Threshold",
    "account_principal",
    "key_principal",
    "source_key",
    "unknown_account",
]

Clock = Callable[[], int]  # microseconds since the epoch

_log = get_logger("auth.lockout")
_MINUTE_US: Final = 60_000_000
_HOUR_US: Final = 60 * _MINUTE_US


@dataclass(frozen=True, slots=True)
class Threshold:
    """Lock after `failures` failures within `window_us`, for `base_lock_us` doubling per further failure up to
    `max_lock_us`."""

    failures: int
    window_us: int
    base_lock_us: int
    max_lock_us: int

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window_us <= 0 or not 0 < self.base_lock_us <= self.max_lock_us:
            raise ValueError(f"invalid lockout threshold {self}")

    def lock_us(self, failures: int) -> int | None:
        """How long `failures` failures within the window lock for, or None below the threshold."""
        over = failures - self.failures
        if over < 0:
            return None
        if over >= 62:
            return self.max_lock_us
        return min(self.base_lock_us << over, self.max_lock_us)


class LockoutSettingsView(Protocol):
    """The lockout settings (services/auth/settings.py `LockoutSettings`), read-only."""

    @property
    def pair_threshold(self) -> int: ...
    @property
    def account_threshold(self) -> int: ...
    @property
    def key_threshold(self) -> int: ...
    @property
    def ip_threshold(self) -> int: ...
    @property
    def window_s(self) -> float: ...
    @property
    def base_s(self) -> float: ...
    @property
    def max_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    """Thresholds per kind of subject. Defaults: the settings' (pair 5, account 20, key 20, address 100 failures
    within 15 minutes; locks of 30 s doubling up to 1 h)."""

    pair: Threshold = field(default_factory=lambda: Threshold(5, 15 * _MINUTE_US, 30_000_000, _HOUR_US))
    account: Threshold = field(default_factory=lambda: Threshold(20, 15 * _MINUTE_US, 30_000_000, _HOUR_US))
    key: Threshold = field(default_factory=lambda: Threshold(20, 15 * _MINUTE_US, 30_000_000, _HOUR_US))
    source: Threshold = field(default_factory=lambda: Threshold(100, 15 * _MINUTE_US, 30_000_000, _HOUR_US))

    def __post_init__(self) -> None:
        if min(self.account.failures, self.key.failures) <= self.pair.failures:
            raise ValueError("the account's and key's lockout thresholds must be above the pair's")

    @classmethod
    def from_settings(cls, settings: LockoutSettingsView) -> LockoutPolicy:
        window, base, longest = (
            round(s * 1_000_000) for s in (settings.window_s, settings.base_s, settings.max_s)
        )
        return cls(
            pair=Threshold(settings.pair_threshold, window, base, longest),
            account=Threshold(settings.account_threshold, window, base, longest),
            key=Threshold(settings.key_threshold, window, base, longest),
            source=Threshold(settings.ip_threshold, window, base, longest),
        )

    def principal(self, principal: str) -> Threshold:
        return self.key if principal.startswith("key:") else self.account


@dataclass(frozen=True, slots=True)
class Lock:
    """A lock in force: which kind of subject ("pair", "principal", "source") and until when."""

    kind: str
    until_us: int


def source_key(source_ip: str) -> str:
    """The address an attempt is counted under: an IPv4 address, an IPv6 /64, or "unknown"."""
    try:
        address = ipaddress.ip_address(source_ip.strip("[]"))
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def account_principal(user_id: str) -> str:
    """The lockout principal of a user (or of `unknown_account(username)`)."""
    return f"account:{user_id}"


def key_principal(key_id: str) -> str:
    """The lockout principal of an API key (its epoch: the key record's version)."""
    return f"key:{key_id}"


def unknown_account(username: str) -> str:
    """The stable pseudo user id an unknown username is counted under (a digest: bounded, no separators)."""
    return "unknown-" + hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class _Subjects:
    pair: str
    principal: str
    source: str


class Lockout:
    """Counting, locking and unlocking over the hot state (shared by every replica that shares it)."""

    def __init__(self, hot: HotState, clock: Clock, policy: LockoutPolicy | None = None) -> None:
        self._hot = hot
        self._clock = clock
        self.policy = policy or LockoutPolicy()

    @staticmethod
    def _subjects(principal: str, epoch: int, source_ip: str) -> _Subjects:
        return _Subjects(
            Lockout.pair_subject(principal, epoch, source_ip), principal, Lockout.source_subject(source_ip)
        )

    @staticmethod
    def pair_subject(principal: str, epoch: int, source_ip: str) -> str:
        """The hot-state subject of (`principal` at `epoch`, `source_ip`'s address)."""
        return f"pair:{principal}#{epoch}|{source_key(source_ip)}"

    @staticmethod
    def source_subject(source_ip: str) -> str:
        """The hot-state subject of `source_ip`'s address."""
        return f"ip:{source_key(source_ip)}"

    async def locks(self, subjects: Iterable[str]) -> dict[str, int]:
        """The subjects among `subjects` (principals, `pair_subject`s, `source_subject`s) locked now, with when
        each lock ends: each distinct subject read once, all concurrently (a batch's lock check in one round)."""
        ordered = sorted(set(subjects))
        now = self._clock()
        ends = await asyncio.gather(*(self._hot.locked_until(subject, now) for subject in ordered))
        return {subject: until for subject, until in zip(ordered, ends, strict=True) if until is not None}

    async def locked(self, principal: str, epoch: int, source_ip: str) -> Lock | None:
        """The lock that refuses `principal` from `source_ip` now (pair first, then address, then principal),
        or None."""
        subjects = self._subjects(principal, epoch, source_ip)
        now = self._clock()
        for kind, subject in (("pair", subjects.pair), ("source", subjects.source), ("principal", principal)):
            until = await self._hot.locked_until(subject, now)
            if until is not None:
                return Lock(kind, until)
        return None

    async def record_failure(
        self,
        principal: str,
        epoch: int,
        source_ip: str,
        cause: str,
        *,
        lock: Lock | None = None,
        count: bool = True,
        user_id: str | None = None,
        key_id: str | None = None,
    ) -> None:
        """Count and log one failed attempt (`cause`: what was wrong, for the log). `lock` is what `locked`
        answered before the attempt: an attempt refused by a pair or address lock is logged but not counted
        (the backoff grows from attempts after the lock, and a stopped source adds nothing to the principal);
        one refused by the principal's lock alone counts for the pair and the address. `count=False` logs
        without counting (an attempt refused by a lock although its credentials were right)."""
        subjects = self._subjects(principal, epoch, source_ip)
        now = self._clock()
        fields: dict[str, object] = {"cause": cause, "source": source_key(source_ip)}
        if user_id is not None:
            fields["user_id"] = user_id
        if key_id is not None:
            fields["key_id"] = key_id
        if lock is not None:
            fields["locked"] = lock.kind
            fields["locked_until_us"] = lock.until_us
        if not count or (lock is not None and lock.kind in ("pair", "source")):
            _log.warning("auth.failure", counted=False, **fields)
            return
        policy = self.policy
        pair_failures = await self._hot.count_failure(subjects.pair, policy.pair.window_us)
        source_failures = await self._hot.count_failure(subjects.source, policy.source.window_us)
        principal_failures: int | None = None
        principal_threshold = policy.principal(principal)
        if lock is None and pair_failures <= policy.pair.failures:
            # Only a source's first `pair.failures` failures within the window count against the principal.
            principal_failures = await self._hot.count_failure(principal, principal_threshold.window_us)
        _log.warning(
            "auth.failure",
            counted=True,
            pair_failures=pair_failures,
            source_failures=source_failures,
            principal_failures=principal_failures,
            **fields,
        )
        await self._maybe_lock("pair", subjects.pair, policy.pair, pair_failures, now=now, fields=fields)
        await self._maybe_lock(
            "source", subjects.source, policy.source, source_failures, now=now, fields=fields
        )
        if principal_failures is not None:
            await self._maybe_lock(
                "principal", principal, principal_threshold, principal_failures, now=now, fields=fields
            )

    async def record_source_failure(self, source_ip: str, cause: str) -> None:
        """Count and log a failure that names no principal (an unknown or spent second-factor token): against
        the source address only."""
        source = source_key(source_ip)
        failures = await self._hot.count_failure(f"ip:{source}", self.policy.source.window_us)
        fields: dict[str, object] = {"cause": cause, "source": source}
        _log.warning("auth.failure", counted=True, source_failures=failures, **fields)
        await self._maybe_lock(
            "source", f"ip:{source}", self.policy.source, failures, now=self._clock(), fields=fields
        )

    async def _maybe_lock(
        self,
        kind: str,
        subject: str,
        threshold: Threshold,
        failures: int,
        *,
        now: int,
        fields: dict[str, object],
    ) -> None:
        duration = threshold.lock_us(failures)
        if duration is None:
            return
        until = now + duration
        await self._hot.lock(subject, until)
        _log.warning(
            "auth.locked",
            kind=kind,
            subject=subject,
            until_us=until,
            lock_us=duration,
            failures=failures,
            **fields,
        )

    async def record_success(self, principal: str, epoch: int, source_ip: str) -> None:
        """A full authentication succeeded: clear the pair's failures (the principal's and address's stand)."""
        await self._hot.clear_failures(self._subjects(principal, epoch, source_ip).pair)

    async def unlock_principal(self, principal: str, cause: str) -> None:
        """Lift the principal's own lock and clear its failures (an operator's unlock; pair locks are released by
        moving the epoch, which the caller does), logged with `cause`."""
        await self._hot.unlock(principal)
        await self._hot.clear_failures(principal)
        _log.info("auth.unlocked", subject=principal, cause=cause)
