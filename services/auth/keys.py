"""API keys: create, rotate, revoke, list, and verify signed requests (the guards' batch RPC and the HTTP edge).

Pure core (no grpc, no database driver). The wire format and its primitives are the kit's (tradeguard.signing).

Keys:
- `create`: an id "tgk_…" (checksummed), scopes within the owner's permissions, an IP allow-list (IPv4 and IPv6
  CIDRs, at most 64, host bits must be zero), a tier, a lifetime (default 90 days; a key without an IP allow-list
  may live at most 90 days, one with a list at most 2 years), a label. An HMAC key's secret ("tgs_…") is returned
  once and stored only as a key vault ciphertext bound to the key id; an Ed25519 key registers the client's
  32-byte public key.
- `rotate`: a new secret (or public key); the previous one still verifies for `grace_us` (at most 7 days).
- `revoke`: the key stops verifying at once here, and a KEY revocation is published to every guard.

A key locked out (see "Lockout" below) has no unlock of its own: rotating it (a new secret, a new version, so a
new lockout epoch, and its principal lock lifted) or revoking it is the way out.

`verify(requests)` answers each request alone, checking in this order (the first failure is the cause, logged
with the key id and source address, never a secret or a signature; the caller only ever sees one opaque
failure):
  0. the source address is not locked out ("source locked");
  1. the key id's format and checksum (a fake is refused without a store lookup);
  2. the key exists, is not revoked, not expired; it is not locked out from this source ("key locked for this
     source": the (key, address) pair) nor altogether ("key locked"); its owner still exists (each distinct key
     of a batch is read from the store once per batch, never kept between batches);
  3. the timestamp (strict decimal) within the window (5 s by default, at most 60) and at most 1 s ahead;
  4. the source address in the key's IP allow-list (when it has one);
  5. the signature (strict lowercase hex) by the current secret / public key, or by the previous one while its
     grace period lasts;
  6. the nonce (strict format) claimed for the first time (HotState.claim_nonce, remembered for window + future
     skew) — only after the signature verified, so nobody can burn the nonces of others;
  7. the method's permission in the key's effective scopes (its scopes that its owner still holds): otherwise
     the request is authentic but `permission_denied`.

Lockout (services/auth/lockout.py; principal `key_principal(key id)`, epoch the key's record version): the
locks of a batch are read before any signature is checked, with one `locked_until` per distinct source address,
per distinct key found and per distinct (key, address) pair, all in one concurrent round. A request refused by a
lock is logged but not counted. A failure after the key was found (a malformed, stale or future timestamp, a
source outside the allow-list, a malformed nonce, digest or signature, a wrong signature, a replayed nonce)
counts for the key and its source as a login failure does for a user (the pair first; the key's own count takes
only a source's first pair-threshold failures, so one address cannot lock a key out); a malformed or unknown key
id, a revoked or expired key or one whose owner is gone counts for the source address only (still without a
store lookup for a bad checksum); a stored secret that does not open is the service's fault and counts for
nobody. An authentic request (allowed or permission-denied) clears only its (key, address) pair's failures, once
per distinct pair of the batch: the key's and the address's counts stand, so the owner's traffic never resets
what a distributed attacker accumulated.

Bounded state: the owner-permission cache holds at most 10,000 owners for 5 s each (so a role change reaches
keys within 5 s); the parsed allow-lists are memoised for at most 4,096 distinct lists; decrypted secrets are
cached by the vault client (see services/auth/vault_client.py).
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final, Protocol

import structlog

from services.auth.hot import HotState
from services.auth.lockout import Lock, Lockout, LockoutPolicy, LockoutSettingsView, key_principal
from services.auth.model import ApiKey, ApiKeyKind, RevocationKind, User
from services.auth.ports import Sealer
from services.auth.store import AuthStore
from tradeguard import signing
from tradeguard.errors import FailedPrecondition, InvalidArgument, NotFound, OpaqueError, PermissionDenied
from tradeguard.principal import Principal

__all__ = [
    "DEFAULT_LIFETIME_US",
    "MAX_BOUND_LIFETIME_US",
    "MAX_GRACE_US",
    "MAX_UNBOUND_LIFETIME_US",
    "ApiKeyService",
    "KeySettings",
    "LoadOwner",
    "SecretSealer",
    "Verdict",
]

_DAY_US: Final = 86_400 * 1_000_000
DEFAULT_LIFETIME_US: Final = 90 * _DAY_US
MAX_UNBOUND_LIFETIME_US: Final = 90 * _DAY_US  # a key without an IP allow-list expires within 90 days
MAX_BOUND_LIFETIME_US: Final = 730 * _DAY_US
MAX_GRACE_US: Final = 7 * _DAY_US
MAX_CIDRS: Final = 64
MAX_LABEL: Final = 128
OWNER_CACHE_SIZE: Final = 10_000
OWNER_CACHE_TTL_US: Final = 5 * 1_000_000
_TIER: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_INSERT_ATTEMPTS: Final = 3
_UPDATE_ATTEMPTS: Final = 5

Clock = Callable[[], int]
LoadOwner = Callable[[str], Awaitable[tuple[User, frozenset[str]] | None]]
"""user id -> (the user, their current permissions), or None when the user does not exist."""

log = structlog.get_logger("auth.keys")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class KeySettings(Protocol):
    """What the key service reads of the auth service's Settings (services/auth/settings.py)."""

    @property
    def replay_window_ms(self) -> int: ...

    @property
    def future_skew_ms(self) -> int: ...

    @property
    def lockout(self) -> LockoutSettingsView: ...


class SecretSealer(Sealer, Protocol):
    """The vault client's cached opener of API-key secrets (services/auth/vault_client.py)."""

    async def open_secret(self, key_id: str, ciphertext: str) -> str: ...

    def forget(self, key_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """One signed request's outcome: `principal` (authentic and allowed), `permission_denied` (authentic, but
    the key's scopes lack the permission) or neither with `cause` (authentication failed; for the log only)."""

    principal: Principal | None = None
    permission_denied: bool = False
    cause: str | None = None

    @classmethod
    def failed(cls, cause: str) -> Verdict:
        return cls(cause=cause)

    @property
    def ok(self) -> bool:
        return self.principal is not None


class _Counts(Enum):
    """What a failed verification step counts against (lockout)."""

    KEY = "key"  # the key (its pair with the source first) and the source address
    SOURCE = "source"  # the source address only
    NOBODY = "nobody"  # not the caller's fault


class _Refused(Exception):
    """A verification step failed: its cause (internal), what it counts against, and the lock that refused it
    (a locked refusal is logged, never counted)."""

    def __init__(
        self,
        cause: str,
        counts: _Counts = _Counts.KEY,
        *,
        key: ApiKey | None = None,
        lock: Lock | None = None,
    ) -> None:
        super().__init__(cause)
        self.counts = counts
        self.key = key
        self.lock = lock


@functools.lru_cache(maxsize=4096)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=True) for cidr in cidrs)


def _address_allowed(source_ip: str, cidrs: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        raise _Refused("source address malformed") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
    return any(address in network for network in _networks(cidrs))


def check_cidrs(ip_allow_list: Iterable[str]) -> tuple[str, ...]:
    """The allow-list in normal form; InvalidArgument naming each bad entry."""
    cidrs = list(ip_allow_list)
    if len(cidrs) > MAX_CIDRS:
        raise InvalidArgument.field("ip_allow_list", f"at most {MAX_CIDRS} entries")
    normal: list[str] = []
    problems = []
    for i, cidr in enumerate(cidrs):
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=True)
        except ValueError:
            problems.append(
                InvalidArgument.field(
                    f"ip_allow_list[{i}]", "not an IPv4 or IPv6 network with zero host bits"
                )
            )
            continue
        if str(network) not in normal:
            normal.append(str(network))
    if problems:
        raise InvalidArgument([v for p in problems for v in p.violations])
    return tuple(normal)


class _OwnerCache:
    """user id -> (fetched at, user and permissions | None), LRU-bounded, each entry for a short time."""

    def __init__(self, size: int, ttl_us: int) -> None:
        self.size, self.ttl_us = size, ttl_us
        self._entries: OrderedDict[str, tuple[int, tuple[User, frozenset[str]] | None]] = OrderedDict()

    def get(self, user_id: str, now_us: int) -> tuple[bool, tuple[User, frozenset[str]] | None]:
        entry = self._entries.get(user_id)
        if entry is None or now_us - entry[0] >= self.ttl_us:
            return False, None
        self._entries.move_to_end(user_id)
        return True, entry[1]

    def put(self, user_id: str, now_us: int, owner: tuple[User, frozenset[str]] | None) -> None:
        self._entries[user_id] = (now_us, owner)
        self._entries.move_to_end(user_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class ApiKeyService:
    def __init__(  # noqa: PLR0917 - the service's dependencies, in the documented order
        self,
        store: AuthStore,
        hot: HotState,
        sealer: SecretSealer,
        clock: Clock,
        random: signing.Random,
        settings: KeySettings,
        load_owner: LoadOwner,
    ) -> None:
        self._store, self._hot, self._sealer = store, hot, sealer
        self._clock, self._random, self._load_owner = clock, random, load_owner
        self._window_ms, self._future_ms = settings.replay_window_ms, settings.future_skew_ms
        signing.check_window(0, 0, self._window_ms, self._future_ms)  # refuses a window beyond the standard's
        self._nonce_ttl_us = (self._window_ms + self._future_ms) * 1000
        self._owners = _OwnerCache(OWNER_CACHE_SIZE, OWNER_CACHE_TTL_US)
        self._lockout = Lockout(hot, clock, LockoutPolicy.from_settings(settings.lockout))

    @property
    def lockout(self) -> Lockout:
        return self._lockout

    # --- administration --------------------------------------------------------------------------------------

    async def create(  # noqa: PLR0917 - the request's fields
        self,
        user_id: str,
        kind: ApiKeyKind,
        scopes: Iterable[str],
        ip_allow_list: Iterable[str],
        tier: str,
        lifetime_us: int | None,
        public_key: bytes | None,
        label: str,
    ) -> tuple[ApiKey, str | None]:
        """A new key of `user_id` and, for an HMAC key, its secret (shown once, never stored in clear)."""
        scope_set = frozenset(scopes)
        cidrs = check_cidrs(ip_allow_list)
        lifetime = self._check_lifetime(lifetime_us, bound=bool(cidrs))
        if not scope_set:
            raise InvalidArgument.field("scopes", "at least one permission")
        if _TIER.fullmatch(tier) is None:
            raise InvalidArgument.field(
                "tier", "1-32 characters of a-z 0-9 _ -, starting with a letter or digit"
            )
        if len(label) > MAX_LABEL or any(not c.isprintable() for c in label):
            raise InvalidArgument.field("label", f"at most {MAX_LABEL} printable characters")
        if kind is ApiKeyKind.ED25519:
            if public_key is None:
                raise InvalidArgument.field("public_key", "an Ed25519 key registers its 32-byte public key")
            public_key = self._check_public_key(public_key)
        elif public_key is not None:
            raise InvalidArgument.field("public_key", "only an Ed25519 key has one")
        owner = await self._load_owner(user_id)
        if owner is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        user, permissions = owner
        if not scope_set <= permissions:
            raise PermissionDenied(
                "an API key's scopes must be within its owner's permissions",
                reason="SCOPES_EXCEED_OWNER",
                metadata={"scopes": " ".join(sorted(scope_set - permissions))},
            )
        now_us = self._clock()
        for _ in range(_INSERT_ATTEMPTS):
            key_id = signing.new_key_id(self._random)
            secret = signing.new_hmac_secret(self._random) if kind is ApiKeyKind.HMAC else None
            sealed = None if secret is None else await self._sealer.seal(secret.encode(), key_id.encode())
            key = ApiKey(
                key_id=key_id,
                user_id=user.user_id,
                account_id=user.account_id,
                kind=kind,
                scopes=scope_set,
                ip_allow_list=cidrs,
                tier=tier,
                create_time_us=now_us,
                expire_time_us=now_us + lifetime,
                secret=sealed,
                public_key=public_key,
                label=label,
            )
            if await self._store.insert_api_key(key):
                log.info("auth.api_key_created", key_id=key_id, user_id=user.user_id, kind=kind.value)
                return key, secret
        raise RuntimeError("could not draw an unused key id")  # 190 random bits: never in practice

    async def rotate(self, key_id: str, grace_us: int, public_key: bytes | None) -> tuple[ApiKey, str | None]:
        """A new secret (HMAC; returned once) or public key (Ed25519); the previous one verifies for `grace_us`
        more (0: not at all). A revoked or expired key is not rotated.

        Rotation is also the operator's unlock of a locked-out key (with revocation the only one): the new
        version is a new lockout epoch, which releases every (key, address) pair lock, and the key's own lock
        and failures are lifted (logged `auth.unlocked`, cause "key rotated"). Source address locks stand."""
        if not 0 <= grace_us <= MAX_GRACE_US:
            raise InvalidArgument.field("grace_period", "between 0 and 7 days")
        for _ in range(_UPDATE_ATTEMPTS):
            key = await self._live_key(key_id)
            now_us = self._clock()
            secret: str | None = None
            if key.kind is ApiKeyKind.HMAC:
                if public_key is not None:
                    raise InvalidArgument.field("public_key", "only an Ed25519 key has one")
                secret = signing.new_hmac_secret(self._random)
                sealed = await self._sealer.seal(secret.encode(), key_id.encode())
                rotated = replace(
                    key,
                    secret=sealed,
                    previous_secret=key.secret if grace_us else None,
                    previous_expire_time_us=now_us + grace_us if grace_us else None,
                    version=key.version + 1,
                )
            else:
                if public_key is None:
                    raise InvalidArgument.field("public_key", "an Ed25519 key rotates to a new public key")
                rotated = replace(
                    key,
                    public_key=self._check_public_key(public_key),
                    previous_public_key=key.public_key if grace_us else None,
                    previous_expire_time_us=now_us + grace_us if grace_us else None,
                    version=key.version + 1,
                )
            if await self._store.update_api_key(rotated, key.version):
                self._sealer.forget(key_id)
                await self._lockout.unlock_principal(key_principal(key_id), cause="key rotated")
                log.info("auth.api_key_rotated", key_id=key_id, grace_us=grace_us)
                return rotated, secret
        raise FailedPrecondition("the key kept changing; try again", reason="CONCURRENT_UPDATE")

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke the key (idempotent) and tell every guard (a KEY revocation)."""
        for _ in range(_UPDATE_ATTEMPTS):
            key = await self._store.get_api_key(key_id)
            if key is None:
                raise NotFound("API key not found", reason="API_KEY_NOT_FOUND")
            if key.revoke_time_us is not None:
                return key
            now_us = self._clock()
            revoked = replace(key, revoke_time_us=now_us, version=key.version + 1)
            if await self._store.update_api_key(revoked, key.version):
                self._sealer.forget(key_id)
                await self._hot.publish_revocation(
                    RevocationKind.KEY, key_id, now_us, max(key.expire_time_us, now_us + self._nonce_ttl_us)
                )
                log.info("auth.api_key_revoked", key_id=key_id, user_id=key.user_id)
                return revoked
        raise FailedPrecondition("the key kept changing; try again", reason="CONCURRENT_UPDATE")

    async def get(self, key_id: str) -> ApiKey | None:
        return await self._store.get_api_key(key_id) if signing.key_id_valid(key_id) else None

    async def list(self, user_id: str) -> builtins.list[ApiKey]:
        return await self._store.list_api_keys(user_id)

    async def _live_key(self, key_id: str) -> ApiKey:
        key = await self.get(key_id)
        if key is None:
            raise NotFound("API key not found", reason="API_KEY_NOT_FOUND")
        if key.revoke_time_us is not None:
            raise FailedPrecondition("the key is revoked", reason="API_KEY_REVOKED")
        if key.expire_time_us <= self._clock():
            raise FailedPrecondition("the key has expired", reason="API_KEY_EXPIRED")
        return key

    @staticmethod
    def _check_lifetime(lifetime_us: int | None, *, bound: bool) -> int:
        if lifetime_us is None:
            return DEFAULT_LIFETIME_US
        limit = MAX_BOUND_LIFETIME_US if bound else MAX_UNBOUND_LIFETIME_US
        if not 0 < lifetime_us <= limit:
            what = "2 years" if bound else "90 days for a key without an IP allow-list"
            raise InvalidArgument.field("lifetime", f"positive, at most {what}")
        return lifetime_us

    @staticmethod
    def _check_public_key(public_key: bytes) -> bytes:
        try:
            return signing.check_ed25519_public_key(public_key)
        except signing.MalformedRequest as error:
            raise InvalidArgument.field("public_key", error.problem) from None

    # --- verification ----------------------------------------------------------------------------------------

    async def verify(self, requests: Sequence[signing.SignedRequest]) -> builtins.list[Verdict]:
        """One verdict per request, in order; each request is judged alone (see the module docstring). The key
        vault being unreachable fails the whole batch (Unavailable): a retryable outage, not a bad request.

        Each distinct key of the batch is read from the store once, when the batch is verified (a guard's batch
        usually holds many calls signed with the same few keys); nothing is kept between batches, so a key
        revoked, rotated or expired before a batch is judged as such by that batch. The lockout's locks are read
        after the keys, once per distinct address, key and (key, address) pair, before any signature is checked;
        an authentic request's pair failures are cleared once per distinct pair after the batch."""
        key_ids = {request.key_id for request in requests if signing.key_id_valid(request.key_id)}
        ordered = sorted(key_ids)
        found = await asyncio.gather(*(self._store.get_api_key(key_id) for key_id in ordered))
        keys = dict(zip(ordered, found, strict=True))
        subjects: set[str] = set()
        for request in requests:
            subjects.add(Lockout.source_subject(request.source_ip))
            key = keys.get(request.key_id)
            if key is not None:
                principal = key_principal(key.key_id)
                subjects.update((principal, Lockout.pair_subject(principal, key.version, request.source_ip)))
        locks = await self._lockout.locks(subjects)
        verdicts = await asyncio.gather(*(self._verify_one(request, keys, locks) for request in requests))
        authentic: dict[
            str, tuple[str, int, str]
        ] = {}  # pair subject -> (principal, epoch, a source address)
        for request, verdict in zip(requests, verdicts, strict=True):
            key = keys.get(request.key_id)
            if key is not None and (verdict.ok or verdict.permission_denied):
                principal = key_principal(key.key_id)
                pair = Lockout.pair_subject(principal, key.version, request.source_ip)
                authentic.setdefault(pair, (principal, key.version, request.source_ip))
        await asyncio.gather(*(self._lockout.record_success(*success) for success in authentic.values()))
        return list(verdicts)

    async def _verify_one(
        self, request: signing.SignedRequest, keys: Mapping[str, ApiKey | None], locks: Mapping[str, int]
    ) -> Verdict:
        try:
            principal, allowed = await self._check(request, keys, locks)
        except _Refused as refused:
            cause = str(refused)
            log.warning(
                "auth.signed_request_refused",
                cause=cause,
                key_id=request.key_id[:64],
                source_ip=request.source_ip[:64],
                path=request.path[:256],
            )
            await self._count(request, refused)
            return Verdict.failed(cause)
        if not allowed:
            log.info(
                "auth.signed_request_denied",
                key_id=request.key_id,
                permission=request.required_permission,
                source_ip=request.source_ip[:64],
            )
            return Verdict(permission_denied=True)
        return Verdict(principal=principal)

    async def _count(self, request: signing.SignedRequest, refused: _Refused) -> None:
        """The lockout's count and log of a refusal (see the module docstring)."""
        cause, key = str(refused), refused.key
        if refused.lock is not None:
            await self._lockout.record_failure(
                key_principal(request.key_id[:64]),
                0 if key is None else key.version,
                request.source_ip,
                cause,
                lock=refused.lock,
                count=False,
                key_id=request.key_id[:64],
            )
        elif refused.counts is _Counts.KEY and key is not None:
            await self._lockout.record_failure(
                key_principal(key.key_id), key.version, request.source_ip, cause, key_id=key.key_id
            )
        elif refused.counts is not _Counts.NOBODY:
            await self._lockout.record_source_failure(request.source_ip, cause)

    async def _check(
        self, request: signing.SignedRequest, keys: Mapping[str, ApiKey | None], locks: Mapping[str, int]
    ) -> tuple[Principal, bool]:
        # 0. the source address's lock (read for this batch)
        until = locks.get(Lockout.source_subject(request.source_ip))
        if until is not None:
            raise _Refused("source locked", lock=Lock("source", until))
        # 1. format and checksum: no lookup for a fake (`verify` read only the keys of well-formed ids)
        if not signing.key_id_valid(request.key_id):
            raise _Refused("key id malformed or checksum wrong", _Counts.SOURCE)
        # 2. the key (read for this batch), its locks (read for this batch) and its owner
        key = keys.get(request.key_id)
        now_us = self._clock()
        if key is None:
            raise _Refused("key unknown", _Counts.SOURCE)
        if key.revoke_time_us is not None:
            raise _Refused("key revoked", _Counts.SOURCE)
        if key.expire_time_us <= now_us:
            raise _Refused("key expired", _Counts.SOURCE)
        principal_subject = key_principal(key.key_id)
        until = locks.get(Lockout.pair_subject(principal_subject, key.version, request.source_ip))
        if until is not None:
            raise _Refused("key locked for this source", key=key, lock=Lock("pair", until))
        until = locks.get(principal_subject)
        if until is not None:
            raise _Refused("key locked", key=key, lock=Lock("principal", until))
        permissions = await self._owner_permissions(key.user_id, now_us)
        if permissions is None:
            raise _Refused("key owner no longer exists", _Counts.SOURCE)
        # 3. the timestamp and the window
        try:
            timestamp_ms = signing.parse_timestamp(request.timestamp)
        except signing.MalformedRequest:
            raise _Refused("timestamp malformed", key=key) from None
        window = signing.check_window(timestamp_ms, now_us // 1000, self._window_ms, self._future_ms)
        if window is signing.Window.STALE:
            raise _Refused("timestamp outside the window (stale)", key=key)
        if window is signing.Window.FUTURE:
            raise _Refused("timestamp too far in the future", key=key)
        # 4. the source address
        try:
            allowed_from = not key.ip_allow_list or _address_allowed(request.source_ip, key.ip_allow_list)
        except _Refused as refused:
            raise _Refused(str(refused), key=key) from None
        if not allowed_from:
            raise _Refused("source address outside the key's allow-list", key=key)
        # 5. the signature (the nonce's and body digest's format first: they are part of the signed string)
        try:
            signing.parse_nonce(request.nonce)
            signing.parse_body_digest(request.body_sha256)
            scheme = signing.Scheme.HMAC_SHA256 if key.kind is ApiKeyKind.HMAC else signing.Scheme.ED25519
            signing.parse_signature(request.signature, scheme)
        except signing.MalformedRequest as error:
            raise _Refused(f"{error.field} malformed", key=key) from None
        if "\n" in request.path or "\r" in request.path:
            raise _Refused("path malformed", key=key)
        if not await self._signature_valid(key, request, now_us):
            raise _Refused("signature wrong", key=key)
        # 6. the nonce, once (only now: an unsigned request cannot spend a nonce of someone else's)
        if not await self._hot.claim_nonce(key.key_id, request.nonce, self._nonce_ttl_us):
            raise _Refused("nonce replayed", key=key)
        # 7. the permission
        scopes = key.scopes & permissions
        principal = Principal(
            user_id=key.user_id, account_id=key.account_id, scopes=scopes, tier=key.tier, key_id=key.key_id
        )
        return principal, not request.required_permission or request.required_permission in scopes

    async def _signature_valid(self, key: ApiKey, request: signing.SignedRequest, now_us: int) -> bool:
        fields = (request.key_id, request.timestamp, request.nonce, request.path, request.body_sha256)
        in_grace = key.previous_expire_time_us is not None and now_us < key.previous_expire_time_us
        if key.kind is ApiKeyKind.HMAC:
            for ciphertext in (key.secret, key.previous_secret if in_grace else None):
                if ciphertext is None:
                    continue
                try:
                    secret = await self._sealer.open_secret(key.key_id, ciphertext)
                except OpaqueError as error:  # a stored ciphertext that does not open: this key fails alone
                    raise _Refused(f"key secret did not open ({error.cause})", _Counts.NOBODY) from None
                if signing.verify_hmac(secret, request.signature, *fields):
                    return True
            return False
        for public_key in (key.public_key, key.previous_public_key if in_grace else None):
            if public_key is not None and signing.verify_ed25519(public_key, request.signature, *fields):
                return True
        return False

    async def _owner_permissions(self, user_id: str, now_us: int) -> frozenset[str] | None:
        hit, owner = self._owners.get(user_id, now_us)
        if not hit:
            owner = await self._load_owner(user_id)
            self._owners.put(user_id, now_us, owner)
        return None if owner is None else owner[1]
