"""The key vault's core: policy, sealing, the key ring and the secret store, over a `VaultStore`. No gRPC.

Every public operation takes the caller's service name (from its verified SPIFFE ID) and checks, in this order:
the arguments' syntax, the caller's permission (before existence: a denied caller learns nothing), that the vault
is unsealed, then existence. Every operation is logged (operation, caller, resource, version, outcome) without
any material: no plaintext, key, ciphertext, signature or passphrase ever reaches the log.

Key material is unwrapped once per key (when first used after unseal) and kept in memory; a rotation adds the
new version to the live key without re-reading the others. Replicas may share one store. A cached key is trusted
for `key_freshness_us` (TRADEGUARD_VAULT_KEY_FRESHNESS_S, default 0.5 s) after the store last confirmed it; the
next use after that reads the key's stamp (create_us, update_us: one indexed row, `VaultStore.key_stamp`, one
read shared by concurrent operations) and reloads the key if another replica changed it. Changes made by this
replica update its cache at once. With a freshness of 0 every operation reads the stamp: a change made anywhere
holds on every replica from its next operation. Configuration changes are compare-and-swap on `update_us`.

Security of the freshness window (replicas' clocks must agree to well within it, NTP):
- No replica encrypts under a retired version, by construction: min_decryption_version may be raised to N only
  once version N is at least `key_freshness_us` old (else FAILED_PRECONDITION, VERSION_TOO_NEW, with the time
  to retry), and by then every replica's cache was confirmed after N existed, so every replica encrypts under N
  or newer. Nothing sealed after the raise is unreadable.
- A replica may still decrypt (and verify) under a version retired elsewhere, or use a key deleted elsewhere,
  for at most `key_freshness_us` after the change: the same budget as every other revocation in the mesh
  ("well under a second", DESIGN.md). Set 0 where a retirement must hold at once (one store read per use).
- A name deleted and created again within the window may be used with the deleted key's material by a replica
  that still has it cached: do not re-create a deleted name within `key_freshness_us`.
- A confirmation counts from the moment its store read began, and a read slower than the window is not trusted
  (the operation confirms again, then fails UNAVAILABLE, KEY_STORE_SLOW).

AES-GCM with random 96-bit nonces is safe for about 2^32 encryptions per key version: the vault counts the
encryptions under each version (in memory, added to the store's count every `usage_flush_every` encryptions and
on every rotation check) and rotates the key once a version reaches `max_encryptions_per_version`.
Time and randomness are injected.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from structlog.typing import FilteringBoundLogger

from services.keyvault import secrets as secret_box
from services.keyvault.errors import (
    DecryptionFailed,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    cas_mismatch,
    deletion_not_allowed,
    key_exists,
    key_not_found,
    permission_denied,
    secret_not_found,
    secret_version_destroyed,
    unseal_failed,
    vault_sealed,
    version_too_new,
)
from services.keyvault.keyring import (
    KeyConfig,
    KeyType,
    LoadedKey,
    StoredKey,
    VersionRecord,
    check_key_name,
    material_ad,
    new_material,
    parse_token,
)
from services.keyvault.policy import DEFAULT_POLICY, Operation, Policy
from services.keyvault.root import (
    ROOT_CHECK_META,
    RootKey,
    RootUnwrapError,
    WrongPassphrase,
    matches_root_check,
    root_check,
)
from services.keyvault.secrets import SecretVersionInfo
from services.keyvault.store import RootChanged, SecretRecord, VaultStore
from tradeguard.observability.annotations import annotate
from tradeguard.observability.logging import get_logger

__all__ = ["DataKey", "KeyVault", "SealStatus"]

T = TypeVar("T")

Clock = Callable[[], int]  # microseconds since the epoch
Random = Callable[[int], bytes]
Unsealer = Callable[[str], RootKey]  # blocking (scrypt, PKCS#11 login): run off the event loop

NONCE_LEN = 12
DATA_KEY_LEN = 32
MAX_PLAINTEXT_BYTES = 1024 * 1024
MAX_BATCH = 1000
MAX_PAGE_SIZE = 1000
_ROTATE_ATTEMPTS = 8
_SYSTEM = "keyvault"  # the caller name of the vault's own scheduled work (automatic rotation)
MIN_ROTATE_PERIOD_US = 3600 * 1_000_000  # 1 hour
MAX_ROTATE_PERIOD_US = 3653 * 86400 * 1_000_000  # 10 years
DEFAULT_MAX_ENCRYPTIONS = 2**31  # per version: well below the 2^32 bound of random 96-bit GCM nonces
DEFAULT_USAGE_FLUSH_EVERY = 4096
DEFAULT_KEY_FRESHNESS_US = 500_000
_CONFIRM_ATTEMPTS = 3


@dataclass(frozen=True)
class SealStatus:
    sealed: bool
    root_kind: str  # "local" or "pkcs11"


@dataclass(frozen=True)
class DataKey:
    plaintext: bytes | None
    wrapped: str


Stamp = tuple[int, int] | None  # (create_us, update_us) of a key, None if it does not exist
StampRead = tuple[Stamp, int]  # the stamp and the clock when its read began


class _StampChecks:
    """Shared freshness checks of one key, so that many concurrent operations on a key cost one read at a time,
    not one each, without weakening the guarantee. With a freshness window of 0 an operation joins the next read
    of the stamp that starts after the operation began (never one already in flight, which might miss a change
    committed just before). With a window, a read confirms the key from the moment the read began, whoever
    started it: an operation joins the read in flight, if any."""

    __slots__ = ("queued", "running")

    def __init__(self) -> None:
        self.running: asyncio.Task[StampRead] | None = None  # reading now
        self.queued: asyncio.Task[StampRead] | None = None  # reads as soon as `running` is done


def _retrieve(task: asyncio.Task[StampRead]) -> None:
    if not task.cancelled():
        task.exception()  # every joiner may have gone: never "exception was never retrieved"


def _check_size(field_name: str, value: bytes, limit: int = MAX_PLAINTEXT_BYTES) -> None:
    if len(value) > limit:
        raise InvalidArgument.field(field_name, f"must be at most {limit} bytes")


def _check_rotate_period(period_us: int) -> None:
    if period_us != 0 and not MIN_ROTATE_PERIOD_US <= period_us <= MAX_ROTATE_PERIOD_US:
        raise InvalidArgument.field("auto_rotate_period", "must be 0 (off) or between 1 hour and 10 years")


def _rotation_due(stored: StoredKey, now_us: int) -> bool:
    period = stored.config.auto_rotate_period_us
    return period > 0 and now_us - stored.latest.create_us >= period


class KeyVault:
    def __init__(
        self,
        store: VaultStore,
        policy: Policy = DEFAULT_POLICY,
        *,
        clock: Clock,
        random: Random = os.urandom,
        root: RootKey | None = None,
        unsealer: Unsealer | None = None,
        root_kind: str = "local",
        logger: FilteringBoundLogger | None = None,
        max_encryptions_per_version: int = DEFAULT_MAX_ENCRYPTIONS,
        usage_flush_every: int = DEFAULT_USAGE_FLUSH_EVERY,
        key_freshness_us: int = DEFAULT_KEY_FRESHNESS_US,
    ) -> None:
        if max_encryptions_per_version < 1 or usage_flush_every < 1:
            raise ValueError("max_encryptions_per_version and usage_flush_every must be positive")
        if key_freshness_us < 0:
            raise ValueError("key_freshness_us must not be negative")
        self._store = store
        self._policy = policy
        self._clock = clock
        self._random = random
        self._root: RootKey | None = None
        self._pending_root = root
        self._unsealer = unsealer
        self._root_kind = root.kind if root is not None else root_kind
        self._log = logger if logger is not None else get_logger("keyvault")
        self._keys: dict[str, LoadedKey] = {}
        self._confirmed: dict[str, int] = {}  # name → the clock when the store last confirmed the cached key
        self._freshness_us = key_freshness_us
        self._generation: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unseal_lock = asyncio.Lock()
        self._max_encryptions = max_encryptions_per_version
        self._usage_flush_every = usage_flush_every
        self._usage_pending: dict[tuple[str, int], int] = {}  # (key, version) → encryptions not yet stored
        self._usage_known: dict[tuple[str, int], int] = {}  # (key, version) → the store's last known total
        self._checks: dict[str, _StampChecks] = {}

    # --- sealing ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Install the root key given at construction (if any): the vault starts unsealed."""
        root, self._pending_root = self._pending_root, None
        if root is not None:
            await self._install_root(root)
            self._log.info("keyvault.unsealed", root_kind=root.kind, caller=_SYSTEM)

    @property
    def sealed(self) -> bool:
        return self._root is None

    def seal_status(self) -> SealStatus:
        return SealStatus(sealed=self._root is None, root_kind=self._root_kind)

    async def unseal(self, caller: str | None, passphrase: str) -> SealStatus:
        if not passphrase:
            raise InvalidArgument.field("passphrase", "is required")
        self._authorize(caller, Operation.UNSEAL, "vault")
        async with self._unseal_lock:
            if self._root is not None:
                return self.seal_status()
            if self._unsealer is None:
                raise FailedPrecondition("this vault cannot be unsealed by passphrase", reason="NO_UNSEALER")
            try:
                root = await asyncio.to_thread(self._unsealer, passphrase)
            except WrongPassphrase:
                self._record("unseal", caller, warning=True, outcome="wrong_passphrase")
                raise unseal_failed() from None
            await self._install_root(root)
        self._record("unseal", caller, outcome="ok", root_kind=root.kind)
        return self.seal_status()

    async def _install_root(self, root: RootKey) -> None:
        """Check `root` against the key ring's root check (written by the first root) and use it."""
        stored = await self._store.put_meta_if_absent(ROOT_CHECK_META, root_check(root))
        if not matches_root_check(root, stored):
            root.close()
            raise FailedPrecondition(
                "this root key is not the one that wrapped the key ring", reason="ROOT_KEY_MISMATCH"
            )
        self._store.fence(ROOT_CHECK_META, stored)  # no new material under this root once the ring moves
        self._forget_all()
        self._root = root
        self._root_kind = root.kind

    async def _fenced(self, write: Awaitable[T]) -> T:
        """A write of wrapped material. If the ring moved to another root (another replica or operator ran a
        migration), this vault's root is stale: it seals itself (fail closed) and the write is refused."""
        try:
            return await write
        except RootChanged:
            raise self._root_moved() from None

    async def _refuse_if_ring_moved(self) -> None:
        """After stored material failed to unwrap: if the ring now belongs to another root, seal and refuse."""
        root = self._root
        check = await self._store.get_meta(ROOT_CHECK_META)
        if root is not None and check is not None and not matches_root_check(root, check):
            raise self._root_moved()

    def _root_moved(self) -> FailedPrecondition:
        self.seal()
        return FailedPrecondition(
            "the key ring has moved to another root key; this vault sealed itself: restart it with the new root",
            reason="ROOT_KEY_MOVED",
        )

    def seal(self) -> None:
        """Forget the root key and every unwrapped key (operators' emergency stop, and tests)."""
        root, self._root = self._root, None
        self._forget_all()
        if root is not None:
            root.close()
        self._log.info("keyvault.sealed", caller=_SYSTEM)

    async def close(self) -> None:
        for slot in list(self._usage_pending):
            try:
                await self._flush_usage(slot, rotate=False)
            except Exception as error:  # closing anyway: the count is a safety margin, not a record
                self._log.warning("keyvault.usage_flush_failed", resource=slot[0], error=type(error).__name__)
        if self._root is not None:
            self._root.close()
            self._root = None
        self._forget_all()

    # --- helpers ----------------------------------------------------------------------------------------------
    def _authorize(self, caller: str | None, operation: Operation, resource: str) -> None:
        if not self._policy.allows(caller, operation, resource):
            self._record(
                operation.value, caller, warning=True, resource=resource, outcome="permission_denied"
            )
            raise permission_denied(operation.value, resource)

    def _require_root(self) -> RootKey:
        root = self._root
        if root is None:
            raise vault_sealed()
        return root

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _remember(self, key: LoadedKey, confirmed_us: int) -> LoadedKey:
        """Cache `key`, which the store held at some moment after `confirmed_us` (a local change: the clock
        read before writing it; a load: before reading it)."""
        self._generation[key.name] = self._generation.get(key.name, 0) + 1
        self._keys[key.name] = key
        self._confirmed[key.name] = confirmed_us
        return key

    def _forget(self, name: str) -> None:
        self._keys.pop(name, None)
        self._confirmed.pop(name, None)

    def _forget_all(self) -> None:
        self._keys.clear()
        self._confirmed.clear()

    def _trusted(self, name: str) -> LoadedKey | None:
        """The cached key if the store confirmed it less than `key_freshness_us` ago (never with 0)."""
        key = self._keys.get(name)
        if key is None:
            return None
        age = self._clock() - self._confirmed.get(name, 0)
        return key if 0 <= age < self._freshness_us else None

    def _unwrap_versions(self, stored: StoredKey, previous: LoadedKey | None = None) -> LoadedKey:
        root = self._require_root()
        name = stored.config.name
        materials = {
            r.version: root.unwrap(r.wrapped, material_ad(name, r.version))
            for r in stored.versions
            if previous is None or not previous.reusable(r)
        }
        return LoadedKey(stored, materials, previous)

    def _stamp(self, name: str) -> asyncio.Task[StampRead]:
        """The store's stamp of the key, read after now (see `_StampChecks`)."""
        checks = self._checks.get(name)
        if checks is None:
            checks = self._checks[name] = _StampChecks()
        if checks.queued is not None:
            return checks.queued  # it has not started reading yet
        if checks.running is not None and self._freshness_us > 0:
            return checks.running  # it confirms from when it began: `_key` checks that is within the window
        task = asyncio.ensure_future(self._read_stamp(name, checks, checks.running))
        task.add_done_callback(_retrieve)
        if checks.running is None:
            checks.running = task
        else:
            checks.queued = task
        return task

    async def _read_stamp(
        self, name: str, checks: _StampChecks, after: asyncio.Task[StampRead] | None
    ) -> StampRead:
        if after is not None:
            await asyncio.wait([after])
            checks.running, checks.queued = checks.queued, None
        try:
            started = self._clock()
            return await self._store.key_stamp(name), started
        finally:
            if checks.running is asyncio.current_task():
                checks.running = None
                if checks.queued is None:
                    self._checks.pop(name, None)

    async def _key(self, name: str, *, reload: bool = False) -> LoadedKey:
        """The key as the store had it at most `key_freshness_us` ago (with 0: as the store has it now). A
        cached key confirmed within that window is used as it is; after it, one cheap read of its stamp
        confirms it or shows that another replica changed it (then it is loaded again, as with `reload`)."""
        self._require_root()
        if not reload:
            trusted = self._trusted(name)
            if trusted is not None:
                return trusted
        for _ in range(_CONFIRM_ATTEMPTS):
            key = await self._confirm(name, reload=reload)
            if self._freshness_us == 0 or self._trusted(name) is key:
                return key
            reload = False  # the store answered slower than the window: confirm again
        raise Unavailable(
            "the key store answers too slowly to confirm that the key is current", reason="KEY_STORE_SLOW"
        )

    async def _confirm(self, name: str, *, reload: bool) -> LoadedKey:
        """The cached key after its stamp shows that no replica changed it since it was loaded; else (or with
        `reload`) the key loaded again."""
        if not reload and name in self._keys:
            stamp, read_us = await asyncio.shield(self._stamp(name))
            self._require_root()
            cached = self._keys.get(name)  # perhaps replaced by a local change meanwhile
            if cached is not None and stamp == (cached.config.create_us, cached.config.update_us):
                self._confirmed[name] = max(self._confirmed.get(name, read_us), read_us)
                return cached
        generation = self._generation.get(name, 0)
        started = self._clock()
        stored = await self._store.get_key(name)
        self._require_root()
        if self._generation.get(name, 0) != generation:
            # A local change (rotation, configuration, deletion) raced with this load: keep the newer.
            winner = self._keys.get(name)
            if winner is None:
                raise key_not_found(name)
            if stored is None or winner.config.update_us >= stored.config.update_us:
                return winner
        if stored is None:
            self._forget(name)
            raise key_not_found(name)
        try:
            loaded = self._unwrap_versions(stored, self._keys.get(name))
        except RootUnwrapError:
            await self._refuse_if_ring_moved()
            raise  # the ring did not move: this stored material was altered
        return self._remember(loaded, started)

    async def _use(self, name: str, operation: Callable[[LoadedKey], T]) -> T:
        return operation(await self._key(name))

    def _record(self, operation: str, caller: str | None, *, warning: bool = False, **fields: Any) -> None:
        """Log what an operation did (never material): on its RPC's one log line when a caller's RPC is in
        progress (`annotate`), else, and always for the vault's own scheduled work, as a line of its own."""
        event = "keyvault." + operation
        if caller != _SYSTEM and annotate(operation=event, **fields):
            return
        (self._log.warning if warning else self._log.info)(event, caller=caller, **fields)

    async def _logged(self, operation: str, caller: str | None, resource: str, work: Awaitable[T]) -> T:
        try:
            result = await work
        except DecryptionFailed as error:
            self._record(
                operation, caller, warning=True, resource=resource, outcome="failed", cause=error.cause
            )
            raise
        except DomainError as error:
            self._record(operation, caller, resource=resource, outcome=error.reason)
            raise
        self._record(operation, caller, resource=resource, outcome="ok")
        return result

    # --- key administration -----------------------------------------------------------------------------------
    async def create_key(
        self,
        caller: str | None,
        name: str,
        key_type: KeyType,
        *,
        auto_rotate_period_us: int = 0,
        deletion_allowed: bool = False,
    ) -> StoredKey:
        check_key_name(name)
        if auto_rotate_period_us < 0:
            raise InvalidArgument.field("auto_rotate_period", "must not be negative")
        _check_rotate_period(auto_rotate_period_us)
        self._authorize(caller, Operation.CREATE_KEY, "key/" + name)
        return await self._logged(
            "create_key",
            caller,
            name,
            self._create_key(name, key_type, auto_rotate_period_us, deletion_allowed),
        )

    async def _create_key(
        self, name: str, key_type: KeyType, auto_rotate_period_us: int, deletion_allowed: bool
    ) -> StoredKey:
        root = self._require_root()
        now = self._clock()
        material, public_key = new_material(key_type, self._random)
        first = VersionRecord(1, root.wrap(material, material_ad(name, 1)), public_key, now)
        config = KeyConfig(name, key_type, 1, auto_rotate_period_us, deletion_allowed, now, now)
        async with self._lock(name):
            if not await self._fenced(self._store.create_key(config, first)):
                raise key_exists(name)
            stored = StoredKey(config, (first,))
            self._remember(LoadedKey(stored, {1: material}), now)
        return stored

    async def get_key(self, caller: str | None, name: str) -> StoredKey:
        check_key_name(name)
        self._authorize(caller, Operation.READ_KEY, "key/" + name)
        return await self._logged("get_key", caller, name, self._get_key(name))

    async def _get_key(self, name: str) -> StoredKey:
        self._require_root()
        stored = await self._store.get_key(name)
        if stored is None:
            raise key_not_found(name)
        return stored

    async def list_keys(
        self, caller: str | None, page_size: int, page_token: str
    ) -> tuple[list[StoredKey], str]:
        """Keys the caller may read, by name, after `page_token` (the last name of the previous page)."""
        if page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        if page_token:
            check_key_name(page_token, "page_token")
        limit = min(page_size or 100, MAX_PAGE_SIZE)
        fetch = max(limit, 100)
        self._require_root()
        # The token is the last key the caller may read, never a name it may not see: read on until the page
        # holds `limit` visible keys or the key ring ends.
        visible: list[StoredKey] = []
        after = page_token
        while len(visible) < limit:
            page = await self._store.list_keys(after, fetch)
            for stored in page:
                if self._policy.allows(caller, Operation.READ_KEY, "key/" + stored.config.name):
                    visible.append(stored)
                    if len(visible) == limit:
                        break
            if len(page) < fetch:
                break
            after = page[-1].config.name
        next_token = visible[-1].config.name if len(visible) == limit else ""
        self._record("list_keys", caller, resource="key/*", count=len(visible), outcome="ok")
        return visible, next_token

    async def rotate_key(self, caller: str | None, name: str) -> StoredKey:
        check_key_name(name)
        self._authorize(caller, Operation.ROTATE_KEY, "key/" + name)
        return await self._logged("rotate_key", caller, name, self._rotate_now(name))

    async def _rotate_now(self, name: str) -> StoredKey:
        rotated = await self._rotate(name)
        assert rotated is not None  # unconditional
        return rotated

    async def _rotate(
        self, name: str, still_due: Callable[[StoredKey], bool] | None = None
    ) -> StoredKey | None:
        """Add a version; with `still_due`, only if it holds of the key as reloaded (None if not): another
        replica may have rotated since the caller looked, and a period must not bring two rotations."""
        root = self._require_root()
        async with self._lock(name):
            for _ in range(_ROTATE_ATTEMPTS):
                current = await self._key(name, reload=True)
                stored = current.stored
                if still_due is not None and not still_due(stored):
                    return None
                version = stored.latest.version + 1
                now = self._clock()
                material, public_key = new_material(stored.config.type, self._random)
                record = VersionRecord(
                    version, root.wrap(material, material_ad(name, version)), public_key, now
                )
                update_us = await self._fenced(
                    self._store.add_version(name, record, now, stored.config.update_us)
                )
                if update_us is not None:
                    rotated = StoredKey(
                        replace(stored.config, update_us=update_us), (*stored.versions, record)
                    )
                    self._remember(LoadedKey(rotated, {version: material}, current), now)
                    return rotated
            raise FailedPrecondition(
                "the key is being rotated concurrently; retry", reason="ROTATION_CONFLICT"
            )
        raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see that the loop always exits

    async def update_key_config(
        self,
        caller: str | None,
        name: str,
        *,
        min_decryption_version: int | None = None,
        auto_rotate_period_us: int | None = None,
        deletion_allowed: bool | None = None,
    ) -> StoredKey:
        check_key_name(name)
        if auto_rotate_period_us is not None:
            if auto_rotate_period_us < 0:
                raise InvalidArgument.field("auto_rotate_period", "must not be negative")
            _check_rotate_period(auto_rotate_period_us)
        if min_decryption_version is not None and min_decryption_version < 1:
            raise InvalidArgument.field("min_decryption_version", "must be at least 1")
        self._authorize(caller, Operation.CONFIGURE_KEY, "key/" + name)
        return await self._logged(
            "update_key_config",
            caller,
            name,
            self._update_config(name, min_decryption_version, auto_rotate_period_us, deletion_allowed),
        )

    async def _update_config(
        self,
        name: str,
        min_decryption_version: int | None,
        auto_rotate_period_us: int | None,
        deletion_allowed: bool | None,
    ) -> StoredKey:
        async with self._lock(name):
            for _ in range(_ROTATE_ATTEMPTS):
                # Compare-and-swap on update_us: a change another replica made since this read (a rotation,
                # a raised min_decryption_version) is never overwritten with what this replica read before it.
                current = await self._key(name, reload=True)
                config = current.config
                now = self._clock()
                if min_decryption_version is not None:
                    if min_decryption_version > current.latest_version:
                        raise InvalidArgument.field(
                            "min_decryption_version",
                            f"must not exceed the latest version ({current.latest_version})",
                        )
                    if min_decryption_version > config.min_decryption_version:
                        self._check_retirable(current.stored, min_decryption_version, now)
                    config = replace(config, min_decryption_version=min_decryption_version)
                if auto_rotate_period_us is not None:
                    config = replace(config, auto_rotate_period_us=auto_rotate_period_us)
                if deletion_allowed is not None:
                    config = replace(config, deletion_allowed=deletion_allowed)
                config = replace(config, update_us=now)
                update_us = await self._store.update_config(config, current.config.update_us)
                if update_us is not None:
                    stored = StoredKey(replace(config, update_us=update_us), current.stored.versions)
                    self._remember(LoadedKey(stored, {}, current), now)
                    return stored
            raise FailedPrecondition("the key is being changed concurrently; retry", reason="CONFIG_CONFLICT")
        raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see that the loop always exits

    def _check_retirable(self, stored: StoredKey, version: int, now_us: int) -> None:
        """Versions below `version` may be retired only once every replica encrypts under `version` or newer:
        once `version` is at least `key_freshness_us` old (see the module's security note)."""
        record = next((r for r in stored.versions if r.version == version), None)
        created = stored.latest.create_us if record is None else record.create_us
        wait_us = created + self._freshness_us - now_us
        if wait_us > 0:
            raise version_too_new(stored.config.name, version, wait_us)

    async def delete_key(self, caller: str | None, name: str) -> None:
        check_key_name(name)
        self._authorize(caller, Operation.DELETE_KEY, "key/" + name)
        await self._logged("delete_key", caller, name, self._delete(name))

    async def _delete(self, name: str) -> None:
        self._require_root()
        async with self._lock(name):
            stored = await self._store.get_key(name)
            if stored is None:
                raise key_not_found(name)
            if not stored.config.deletion_allowed:
                raise deletion_not_allowed(name)
            await self._store.delete_key(name)
            self._generation[name] = self._generation.get(name, 0) + 1
            self._forget(name)
            for slot in [s for s in (*self._usage_pending, *self._usage_known) if s[0] == name]:
                self._usage_pending.pop(slot, None)
                self._usage_known.pop(slot, None)

    async def rotate_due(self) -> list[str]:
        """Rotate every key whose automatic rotation period has passed since its latest version; their names."""
        self._require_root()
        rotated: list[str] = []
        for slot in list(
            self._usage_pending
        ):  # store this replica's encryption counts; rotate exhausted keys
            if await self._flush_usage(slot, rotate=True):
                rotated.append(slot[0])
        now = self._clock()
        after = ""
        while True:
            page = await self._store.list_keys(after, MAX_PAGE_SIZE)
            for stored in page:
                name = stored.config.name
                if not _rotation_due(stored, now):
                    continue
                try:
                    done = await self._logged(
                        "auto_rotate",
                        _SYSTEM,
                        name,
                        self._rotate(name, lambda current: _rotation_due(current, self._clock())),
                    )
                except DomainError:  # logged; deleted meanwhile, or contended: the next check retries
                    continue
                if done is not None:
                    rotated.append(name)
            if len(page) < MAX_PAGE_SIZE:
                return rotated
            after = page[-1].config.name

    # --- encryption counts ------------------------------------------------------------------------------------
    async def _count(self, key: LoadedKey, count: int) -> None:
        """Count `count` encryptions under the key's latest version; never fails the encryption itself."""
        if count <= 0:
            return
        slot = (key.name, key.latest_version)
        pending = self._usage_pending.get(slot, 0) + count
        self._usage_pending[slot] = pending
        if (
            pending < self._usage_flush_every
            and self._usage_known.get(slot, 0) + pending < self._max_encryptions
        ):
            return
        try:
            await self._flush_usage(slot, rotate=True)
        except Exception as error:  # the count stays pending; the next flush or rotation check retries
            self._log.error("keyvault.usage_flush_failed", resource=key.name, error=type(error).__name__)

    async def _flush_usage(self, slot: tuple[str, int], *, rotate: bool) -> bool:
        """Add the pending count of `slot` to the store's; rotate the key if the version is exhausted (True)."""
        count = self._usage_pending.pop(slot, 0)
        if count == 0:
            return False
        name, version = slot
        try:
            total = await self._store.add_encryptions(name, version, count)
        except BaseException:
            self._usage_pending[slot] = self._usage_pending.get(slot, 0) + count
            raise
        self._usage_known[slot] = total
        if total < self._max_encryptions or not rotate or self._root is None:
            return False
        self._log.warning(
            "keyvault.encryption_limit",
            caller=_SYSTEM,
            resource=name,
            version=version,
            encryptions=total,
            limit=self._max_encryptions,
        )
        try:
            done = await self._logged(
                "auto_rotate",
                _SYSTEM,
                name,
                self._rotate(name, lambda current: current.latest.version == version),
            )
        except DomainError:  # logged; deleted meanwhile, or contended: the next count or check retries
            return False
        self._usage_known.pop(slot, None)  # rotated now or before: the version takes no more encryptions
        return done is not None

    # --- use of keys ------------------------------------------------------------------------------------------
    async def encrypt(
        self, caller: str | None, name: str, plaintext: bytes, associated_data: bytes = b""
    ) -> str:
        check_key_name(name)
        _check_size("plaintext", plaintext)
        self._authorize(caller, Operation.ENCRYPT, "key/" + name)
        try:
            key = await self._key(name)
            ciphertext = key.encrypt(plaintext, associated_data, self._random(NONCE_LEN))
        except DomainError as error:
            self._record("encrypt", caller, resource=name, outcome=error.reason)
            raise
        self._record("encrypt", caller, resource=name, version=key.latest_version, outcome="ok")
        await self._count(key, 1)
        return ciphertext

    async def decrypt(
        self, caller: str | None, name: str, ciphertext: str, associated_data: bytes = b""
    ) -> bytes:
        check_key_name(name)
        self._authorize(caller, Operation.DECRYPT, "key/" + name)
        return await self._logged("decrypt", caller, name, self._decrypt(name, ciphertext, associated_data))

    async def _decrypt(self, name: str, ciphertext: str, associated_data: bytes) -> bytes:
        return (await self._open(await self._key(name), ciphertext, associated_data))[0]

    async def _open(self, key: LoadedKey, ciphertext: str, associated_data: bytes) -> tuple[bytes, LoadedKey]:
        """(plaintext, the key that opened it) with a current `key`."""
        try:
            return key.decrypt(ciphertext, associated_data)[0], key
        except DecryptionFailed:
            # A version newer than ours: another replica rotated since the freshness check. Reload once.
            token = parse_token(ciphertext)
            if token is None or token.name != key.name or token.version <= key.latest_version:
                raise
        key = await self._key(key.name, reload=True)
        return key.decrypt(ciphertext, associated_data)[0], key

    async def batch_encrypt(
        self, caller: str | None, name: str, items: Sequence[tuple[bytes, bytes]]
    ) -> list[str | DomainError]:
        """Each (plaintext, associated data) sealed under the latest version; a failed item fails alone."""
        check_key_name(name)
        if len(items) > MAX_BATCH:
            raise InvalidArgument.field("items", f"at most {MAX_BATCH} items")
        self._authorize(caller, Operation.ENCRYPT, "key/" + name)
        key = await self._logged("batch_encrypt", caller, name, self._key(name))
        results: list[str | DomainError] = []
        for plaintext, associated_data in items:
            try:
                _check_size("plaintext", plaintext)
                results.append(key.encrypt(plaintext, associated_data, self._random(NONCE_LEN)))
            except DomainError as error:
                results.append(error)
        await self._count(key, sum(isinstance(r, str) for r in results))
        return results

    async def batch_decrypt(
        self, caller: str | None, name: str, items: Sequence[tuple[str, bytes]]
    ) -> list[bytes | DomainError]:
        """Each (ciphertext, associated data) opened; a failed item is its own opaque `DecryptionFailed`."""
        check_key_name(name)
        if len(items) > MAX_BATCH:
            raise InvalidArgument.field("items", f"at most {MAX_BATCH} items")
        self._authorize(caller, Operation.DECRYPT, "key/" + name)
        key = await self._logged("batch_decrypt", caller, name, self._key(name))
        results: list[bytes | DomainError] = []
        for ciphertext, associated_data in items:
            try:
                plaintext, key = await self._open(key, ciphertext, associated_data)
                results.append(plaintext)
            except DecryptionFailed as error:
                self._log.warning(
                    "keyvault.batch_decrypt.item", caller=caller, resource=name, cause=error.cause
                )
                results.append(error)
        return results

    async def rewrap(
        self, caller: str | None, name: str, ciphertext: str, associated_data: bytes = b""
    ) -> str:
        """The same plaintext sealed under the latest version; the plaintext never leaves the vault."""
        check_key_name(name)
        self._authorize(caller, Operation.REWRAP, "key/" + name)
        return await self._logged("rewrap", caller, name, self._rewrap(name, ciphertext, associated_data))

    async def _rewrap(self, name: str, ciphertext: str, associated_data: bytes) -> str:
        plaintext, key = await self._open(await self._key(name), ciphertext, associated_data)
        rewrapped = key.encrypt(plaintext, associated_data, self._random(NONCE_LEN))
        await self._count(key, 1)
        return rewrapped

    async def generate_data_key(
        self, caller: str | None, name: str, associated_data: bytes = b"", *, include_plaintext: bool = True
    ) -> DataKey:
        """A random AES-256 data key sealed under `name` (envelope encryption); the plaintext only if asked."""
        check_key_name(name)
        self._authorize(caller, Operation.GENERATE_DATA_KEY, "key/" + name)
        return await self._logged(
            "generate_data_key",
            caller,
            name,
            self._generate_data_key(name, associated_data, include_plaintext),
        )

    async def _generate_data_key(self, name: str, associated_data: bytes, include_plaintext: bool) -> DataKey:
        key = await self._key(name)
        data_key = self._random(DATA_KEY_LEN)
        wrapped = key.encrypt(data_key, associated_data, self._random(NONCE_LEN))
        await self._count(key, 1)
        return DataKey(plaintext=data_key if include_plaintext else None, wrapped=wrapped)

    async def sign(self, caller: str | None, name: str, message: bytes) -> str:
        check_key_name(name)
        _check_size("message", message)
        self._authorize(caller, Operation.SIGN, "key/" + name)
        return await self._logged("sign", caller, name, self._use(name, lambda key: key.sign(message)))

    async def verify(self, caller: str | None, name: str, message: bytes, signature: str) -> bool:
        """Check an Ed25519 signature (VERIFY right) or an HMAC (only with the HMAC right on that key: checking
        guesses of MAC'd data is as good as computing the MAC)."""
        check_key_name(name)
        resource = "key/" + name
        if not self._policy.allows(caller, Operation.HMAC, resource):
            self._authorize(caller, Operation.VERIFY, resource)
        return await self._logged("verify", caller, name, self._verify(caller, name, message, signature))

    async def _verify(self, caller: str | None, name: str, message: bytes, signature: str) -> bool:
        key = await self._key(name)
        if key.config.type is KeyType.HMAC_SHA256:
            self._authorize(caller, Operation.HMAC, "key/" + name)
        elif key.config.type is KeyType.ED25519:
            self._authorize(caller, Operation.VERIFY, "key/" + name)
        if key.verify(message, signature):
            return True
        token = parse_token(signature)
        if token is not None and token.name == name and token.version > key.latest_version:
            return (await self._key(name, reload=True)).verify(message, signature)
        return False

    async def hmac(self, caller: str | None, name: str, data: bytes) -> str:
        check_key_name(name)
        _check_size("data", data)
        self._authorize(caller, Operation.HMAC, "key/" + name)
        return await self._logged("hmac", caller, name, self._use(name, lambda key: key.hmac(data)))

    # --- the secret store -------------------------------------------------------------------------------------
    async def put_secret(
        self, caller: str | None, owner: str, path: str, value: bytes, *, cas_version: int | None = None
    ) -> SecretVersionInfo:
        """A new version; with `cas_version`, only if the newest version is that one (0: none yet)."""
        secret_box.check_owner(owner)
        secret_box.check_path(path)
        _check_size("value", value, secret_box.MAX_SECRET_BYTES)
        if cas_version is not None and cas_version < 0:
            raise InvalidArgument.field("cas_version", "must not be negative")
        self._authorize(caller, Operation.PUT_SECRET, "secret/" + path)
        return await self._logged(
            "put_secret", caller, f"secret/{path}", self._put_secret(owner, path, value, cas_version)
        )

    async def _put_secret(
        self, owner: str, path: str, value: bytes, cas_version: int | None
    ) -> SecretVersionInfo:
        root = self._require_root()
        for _ in range(_ROTATE_ATTEMPTS):
            latest = await self._store.get_secret_version(owner, path, None)
            current = 0 if latest is None else latest.version
            if cas_version is not None and cas_version != current:
                raise cas_mismatch(owner, path, cas_version, current)
            version = current + 1
            wrapped, sealed = secret_box.seal_secret(
                root, self._random, owner=owner, path=path, version=version, value=value
            )
            record = SecretRecord(owner, path, version, wrapped, sealed, self._clock())
            if await self._fenced(self._store.insert_secret_version(record)):
                return SecretVersionInfo.of(record)
        raise FailedPrecondition("the secret is being written concurrently; retry", reason="SECRET_CONFLICT")

    async def get_secret(
        self, caller: str | None, owner: str, path: str, version: int = 0
    ) -> tuple[bytes, SecretVersionInfo]:
        """The value of a version (0: the newest)."""
        secret_box.check_owner(owner)
        secret_box.check_path(path)
        if version < 0:
            raise InvalidArgument.field("version", "must not be negative")
        self._authorize(caller, Operation.GET_SECRET, "secret/" + path)
        return await self._logged(
            "get_secret", caller, f"secret/{path}", self._get_secret(owner, path, version)
        )

    async def _get_secret(self, owner: str, path: str, version: int) -> tuple[bytes, SecretVersionInfo]:
        root = self._require_root()
        record = await self._store.get_secret_version(owner, path, version or None)
        if record is None:
            raise secret_not_found(owner, path)
        if record.destroyed:
            raise secret_version_destroyed(owner, path, record.version)
        try:
            return secret_box.open_secret(root, record), SecretVersionInfo.of(record)
        except RootUnwrapError:
            await self._refuse_if_ring_moved()
            raise

    async def list_secret_versions(
        self, caller: str | None, owner: str, path: str
    ) -> list[SecretVersionInfo]:
        secret_box.check_owner(owner)
        secret_box.check_path(path)
        self._authorize(caller, Operation.LIST_SECRET_VERSIONS, "secret/" + path)
        return await self._logged(
            "list_secret_versions", caller, f"secret/{path}", self._list_secret(owner, path)
        )

    async def _list_secret(self, owner: str, path: str) -> list[SecretVersionInfo]:
        self._require_root()
        records = await self._store.list_secret_versions(owner, path)
        if not records:
            raise secret_not_found(owner, path)
        return [SecretVersionInfo.of(r) for r in records]

    async def destroy_secret_version(self, caller: str | None, owner: str, path: str, version: int) -> None:
        secret_box.check_owner(owner)
        secret_box.check_path(path)
        if version < 1:
            raise InvalidArgument.field("version", "must be at least 1")
        self._authorize(caller, Operation.DESTROY_SECRET_VERSION, "secret/" + path)
        await self._logged(
            "destroy_secret_version", caller, f"secret/{path}", self._destroy_secret(owner, path, version)
        )

    async def _destroy_secret(self, owner: str, path: str, version: int) -> None:
        self._require_root()
        if not await self._store.destroy_secret_version(owner, path, version, self._clock()):
            raise secret_not_found(owner, path)
