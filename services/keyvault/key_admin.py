"""Key administration: create, read, list, rotate (on demand, on schedule, when exhausted), configure, delete.

Every public operation checks, in this order: the arguments' syntax, the caller's permission (before existence),
that the vault is unsealed, then existence; and is logged without material (`Access`). Changes go through the
store with compare-and-swap on `update_us`, under this replica's per-key lock, and update its key cache at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from services.keyvault.access import SYSTEM, Access
from services.keyvault.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    deletion_not_allowed,
    key_exists,
    key_not_found,
    version_too_new,
)
from services.keyvault.key_cache import KeyCache
from services.keyvault.keyring import LoadedKey, check_key_name, material_ad, new_material
from services.keyvault.model import Clock, KeyConfig, KeyType, Random, StoredKey, VersionRecord
from services.keyvault.policy import Operation
from services.keyvault.sealing import Sealing
from services.keyvault.store import VaultStore
from services.keyvault.usage import UsageCounter

__all__ = ["MAX_PAGE_SIZE", "MAX_ROTATE_PERIOD_US", "MIN_ROTATE_PERIOD_US", "KeyAdmin"]

MAX_PAGE_SIZE = 1000
CHANGE_ATTEMPTS = 8
MIN_ROTATE_PERIOD_US = 3600 * 1_000_000  # 1 hour
MAX_ROTATE_PERIOD_US = 3653 * 86400 * 1_000_000  # 10 years


def _check_rotate_period(period_us: int) -> None:
    if period_us < 0:
        raise InvalidArgument.field("auto_rotate_period", "must not be negative")
    if period_us != 0 and not MIN_ROTATE_PERIOD_US <= period_us <= MAX_ROTATE_PERIOD_US:
        raise InvalidArgument.field("auto_rotate_period", "must be 0 (off) or between 1 hour and 10 years")


def _rotation_due(stored: StoredKey, now_us: int) -> bool:
    period = stored.config.auto_rotate_period_us
    return period > 0 and now_us - stored.latest.create_us >= period


class KeyAdmin:
    def __init__(
        self,
        store: VaultStore,
        access: Access,
        sealing: Sealing,
        cache: KeyCache,
        usage: UsageCounter,
        *,
        clock: Clock,
        random: Random,
    ) -> None:
        self._store = store
        self._access = access
        self._sealing = sealing
        self._cache = cache
        self._usage = usage
        self._clock = clock
        self._random = random

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
        _check_rotate_period(auto_rotate_period_us)
        self._access.authorize(caller, Operation.CREATE_KEY, "key/" + name)
        return await self._access.logged(
            "create_key",
            caller,
            name,
            self._create_key(name, key_type, auto_rotate_period_us, deletion_allowed),
        )

    async def _create_key(
        self, name: str, key_type: KeyType, auto_rotate_period_us: int, deletion_allowed: bool
    ) -> StoredKey:
        root = self._sealing.require()
        now = self._clock()
        material, public_key = new_material(key_type, self._random)
        first = VersionRecord(1, root.wrap(material, material_ad(name, 1)), public_key, now)
        config = KeyConfig(name, key_type, 1, auto_rotate_period_us, deletion_allowed, now, now)
        async with self._cache.lock(name):
            if not await self._sealing.fenced(self._store.create_key(config, first)):
                raise key_exists(name)
            stored = StoredKey(config, (first,))
            self._cache.remember(LoadedKey(stored, {1: material}), now)
        return stored

    async def get_key(self, caller: str | None, name: str) -> StoredKey:
        check_key_name(name)
        self._access.authorize(caller, Operation.READ_KEY, "key/" + name)
        return await self._access.logged("get_key", caller, name, self._get_key(name))

    async def _get_key(self, name: str) -> StoredKey:
        self._sealing.require()
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
        self._sealing.require()
        # The token is the last key the caller may read, never a name it may not see: read on until the page
        # holds `limit` visible keys or the key ring ends.
        visible: list[StoredKey] = []
        after = page_token
        while len(visible) < limit:
            page = await self._store.list_keys(after, fetch)
            for stored in page:
                if self._access.allows(caller, Operation.READ_KEY, "key/" + stored.config.name):
                    visible.append(stored)
                    if len(visible) == limit:
                        break
            if len(page) < fetch:
                break
            after = page[-1].config.name
        next_token = visible[-1].config.name if len(visible) == limit else ""
        self._access.record("list_keys", caller, resource="key/*", count=len(visible), outcome="ok")
        return visible, next_token

    async def rotate_key(self, caller: str | None, name: str) -> StoredKey:
        check_key_name(name)
        self._access.authorize(caller, Operation.ROTATE_KEY, "key/" + name)
        return await self._access.logged("rotate_key", caller, name, self._rotate_now(name))

    async def _rotate_now(self, name: str) -> StoredKey:
        rotated = await self._rotate(name)
        assert rotated is not None  # unconditional
        return rotated

    async def rotate_exhausted(self, name: str, version: int) -> bool:
        """Rotate the key if `version` is still its latest (it took its maximum of encryptions); whether this
        rotated it. Logged as the vault's own work."""
        done = await self._access.logged(
            "auto_rotate", SYSTEM, name, self._rotate(name, lambda current: current.latest.version == version)
        )
        return done is not None

    async def _rotate(
        self, name: str, still_due: Callable[[StoredKey], bool] | None = None
    ) -> StoredKey | None:
        """Add a version; with `still_due`, only if it holds of the key as reloaded (None if not): another
        replica may have rotated since the caller looked, and a period must not bring two rotations."""
        root = self._sealing.require()
        async with self._cache.lock(name):
            for _ in range(CHANGE_ATTEMPTS):
                current = await self._cache.get(name, reload=True)
                stored = current.stored
                if still_due is not None and not still_due(stored):
                    return None
                version = stored.latest.version + 1
                now = self._clock()
                material, public_key = new_material(stored.config.type, self._random)
                record = VersionRecord(
                    version, root.wrap(material, material_ad(name, version)), public_key, now
                )
                update_us = await self._sealing.fenced(
                    self._store.add_version(name, record, now, stored.config.update_us)
                )
                if update_us is not None:
                    rotated = StoredKey(
                        replace(stored.config, update_us=update_us), (*stored.versions, record)
                    )
                    self._cache.remember(LoadedKey(rotated, {version: material}, current), now)
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
            _check_rotate_period(auto_rotate_period_us)
        if min_decryption_version is not None and min_decryption_version < 1:
            raise InvalidArgument.field("min_decryption_version", "must be at least 1")
        self._access.authorize(caller, Operation.CONFIGURE_KEY, "key/" + name)
        return await self._access.logged(
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
        async with self._cache.lock(name):
            for _ in range(CHANGE_ATTEMPTS):
                # Compare-and-swap on update_us: a change another replica made since this read (a rotation,
                # a raised min_decryption_version) is never overwritten with what this replica read before it.
                current = await self._cache.get(name, reload=True)
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
                    self._cache.remember(LoadedKey(stored, {}, current), now)
                    return stored
            raise FailedPrecondition("the key is being changed concurrently; retry", reason="CONFIG_CONFLICT")
        raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see that the loop always exits

    def _check_retirable(self, stored: StoredKey, version: int, now_us: int) -> None:
        """Versions below `version` may be retired only once every replica encrypts under `version` or newer:
        once `version` is at least `key_freshness_us` old (see `key_cache`'s security note)."""
        record = next((r for r in stored.versions if r.version == version), None)
        created = stored.latest.create_us if record is None else record.create_us
        wait_us = created + self._cache.freshness_us - now_us
        if wait_us > 0:
            raise version_too_new(stored.config.name, version, wait_us)

    async def delete_key(self, caller: str | None, name: str) -> None:
        check_key_name(name)
        self._access.authorize(caller, Operation.DELETE_KEY, "key/" + name)
        await self._access.logged("delete_key", caller, name, self._delete(name))

    async def _delete(self, name: str) -> None:
        self._sealing.require()
        async with self._cache.lock(name):
            stored = await self._store.get_key(name)
            if stored is None:
                raise key_not_found(name)
            if not stored.config.deletion_allowed:
                raise deletion_not_allowed(name)
            await self._store.delete_key(name)
            self._cache.deleted(name)
            self._usage.forget(name)

    async def rotate_due(self) -> list[str]:
        """Store this replica's encryption counts (rotating exhausted keys), then rotate every key whose
        automatic rotation period has passed since its latest version; the names of the keys rotated."""
        self._sealing.require()
        rotated: list[str] = []
        for slot in self._usage.pending_slots():
            if await self._usage.flush(slot, rotate=True):
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
                    done = await self._access.logged(
                        "auto_rotate",
                        SYSTEM,
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
