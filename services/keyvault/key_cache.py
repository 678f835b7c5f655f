"""The key cache: keys unwrapped once and kept in memory, trusted for a freshness window, confirmed by stamps.

Key material is unwrapped once per key (when first used after unseal) and kept in memory; a rotation adds the
new version to the live key without re-reading the others. Replicas may share one store. A cached key is trusted
for `key_freshness_us` (TRADEGUARD_KEYVAULT_KEY_FRESHNESS_S, default 0.5 s) after the store last confirmed it; the
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
"""

from __future__ import annotations

import asyncio

from services.keyvault.errors import Unavailable, key_not_found
from services.keyvault.keyring import LoadedKey, material_ad
from services.keyvault.model import Clock, StoredKey
from services.keyvault.root import RootUnwrapError
from services.keyvault.sealing import Sealing
from services.keyvault.store import VaultStore

__all__ = ["DEFAULT_KEY_FRESHNESS_US", "KeyCache"]

DEFAULT_KEY_FRESHNESS_US = 500_000
_CONFIRM_ATTEMPTS = 3

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


class KeyCache:
    def __init__(
        self,
        store: VaultStore,
        sealing: Sealing,
        *,
        clock: Clock,
        key_freshness_us: int = DEFAULT_KEY_FRESHNESS_US,
    ) -> None:
        if key_freshness_us < 0:
            raise ValueError("key_freshness_us must not be negative")
        self._store = store
        self._sealing = sealing
        self._clock = clock
        self.freshness_us = key_freshness_us
        self._keys: dict[str, LoadedKey] = {}
        self._confirmed: dict[str, int] = {}  # name → the clock when the store last confirmed the cached key
        self._generation: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._checks: dict[str, _StampChecks] = {}
        sealing.on_change(self.forget_all)

    def lock(self, name: str) -> asyncio.Lock:
        """The lock of this replica's changes to one key (rotation, configuration, deletion)."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def cached(self, name: str) -> LoadedKey | None:
        return self._keys.get(name)

    def remember(self, key: LoadedKey, confirmed_us: int) -> LoadedKey:
        """Cache `key`, which the store held at some moment after `confirmed_us` (a local change: the clock
        read before writing it; a load: before reading it)."""
        self._generation[key.name] = self._generation.get(key.name, 0) + 1
        self._keys[key.name] = key
        self._confirmed[key.name] = confirmed_us
        return key

    def deleted(self, name: str) -> None:
        """This replica deleted the key: forget it, and let a load racing with the deletion lose."""
        self._generation[name] = self._generation.get(name, 0) + 1
        self.forget(name)

    def forget(self, name: str) -> None:
        self._keys.pop(name, None)
        self._confirmed.pop(name, None)

    def forget_all(self) -> None:
        self._keys.clear()
        self._confirmed.clear()

    def _trusted(self, name: str) -> LoadedKey | None:
        """The cached key if the store confirmed it less than `key_freshness_us` ago (never with 0)."""
        key = self._keys.get(name)
        if key is None:
            return None
        age = self._clock() - self._confirmed.get(name, 0)
        return key if 0 <= age < self.freshness_us else None

    def _unwrap_versions(self, stored: StoredKey, previous: LoadedKey | None = None) -> LoadedKey:
        root = self._sealing.require()
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
        if checks.running is not None and self.freshness_us > 0:
            return checks.running  # it confirms from when it began: `get` checks that is within the window
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

    async def get(self, name: str, *, reload: bool = False) -> LoadedKey:
        """The key as the store had it at most `key_freshness_us` ago (with 0: as the store has it now). A
        cached key confirmed within that window is used as it is; after it, one cheap read of its stamp
        confirms it or shows that another replica changed it (then it is loaded again, as with `reload`)."""
        self._sealing.require()
        if not reload:
            trusted = self._trusted(name)
            if trusted is not None:
                return trusted
        for _ in range(_CONFIRM_ATTEMPTS):
            key = await self._confirm(name, reload=reload)
            if self.freshness_us == 0 or self._trusted(name) is key:
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
            self._sealing.require()
            cached = self._keys.get(name)  # perhaps replaced by a local change meanwhile
            if cached is not None and stamp == (cached.config.create_us, cached.config.update_us):
                self._confirmed[name] = max(self._confirmed.get(name, read_us), read_us)
                return cached
        generation = self._generation.get(name, 0)
        started = self._clock()
        stored = await self._store.get_key(name)
        self._sealing.require()
        if self._generation.get(name, 0) != generation:
            # A local change (rotation, configuration, deletion) raced with this load: keep the newer.
            winner = self._keys.get(name)
            if winner is None:
                raise key_not_found(name)
            if stored is None or winner.config.update_us >= stored.config.update_us:
                return winner
        if stored is None:
            self.forget(name)
            raise key_not_found(name)
        try:
            loaded = self._unwrap_versions(stored, self._keys.get(name))
        except RootUnwrapError:
            await self._sealing.refuse_if_ring_moved()
            raise  # the ring did not move: this stored material was altered
        return self.remember(loaded, started)
