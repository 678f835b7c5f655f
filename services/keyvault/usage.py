"""Usage counting: how many encryptions each key version has sealed, and rotation once a version has done enough.

AES-GCM with random 96-bit nonces is safe for about 2^32 encryptions per key version: the vault counts the
encryptions under each version (in memory, added to the store's count every `usage_flush_every` encryptions and
on every rotation check) and rotates the key once a version reaches `max_encryptions_per_version`. A count never
fails the encryption it counts: a failed flush stays pending and the next one retries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.keyvault.access import SYSTEM, Access
from services.keyvault.errors import DomainError
from services.keyvault.keyring import LoadedKey
from services.keyvault.sealing import Sealing
from services.keyvault.store import VaultStore

__all__ = ["DEFAULT_MAX_ENCRYPTIONS", "DEFAULT_USAGE_FLUSH_EVERY", "Rotate", "UsageCounter"]

DEFAULT_MAX_ENCRYPTIONS = 2**31  # per version: well below the 2^32 bound of random 96-bit GCM nonces
DEFAULT_USAGE_FLUSH_EVERY = 4096

Slot = tuple[str, int]  # (key name, version)
Rotate = Callable[[str, int], Awaitable[bool]]
"""(key name, exhausted version) → rotate the key if that version is still its latest; whether this call rotated
it. Raises a DomainError if the key is gone or contended: the next count or check retries."""


class UsageCounter:
    def __init__(
        self,
        store: VaultStore,
        access: Access,
        sealing: Sealing,
        rotate: Rotate,
        *,
        max_encryptions_per_version: int = DEFAULT_MAX_ENCRYPTIONS,
        usage_flush_every: int = DEFAULT_USAGE_FLUSH_EVERY,
    ) -> None:
        if max_encryptions_per_version < 1 or usage_flush_every < 1:
            raise ValueError("max_encryptions_per_version and usage_flush_every must be positive")
        self._store = store
        self._access = access
        self._sealing = sealing
        self._rotate = rotate
        self._max_encryptions = max_encryptions_per_version
        self._flush_every = usage_flush_every
        self._pending: dict[Slot, int] = {}  # encryptions not yet stored
        self._known: dict[Slot, int] = {}  # the store's last known total

    def pending_slots(self) -> list[Slot]:
        return list(self._pending)

    async def count(self, key: LoadedKey, count: int) -> None:
        """Count `count` encryptions under the key's latest version; never fails the encryption itself."""
        if count <= 0:
            return
        slot = (key.name, key.latest_version)
        pending = self._pending.get(slot, 0) + count
        self._pending[slot] = pending
        if pending < self._flush_every and self._known.get(slot, 0) + pending < self._max_encryptions:
            return
        try:
            await self.flush(slot, rotate=True)
        except Exception as error:  # the count stays pending; the next flush or rotation check retries
            self._access.log.error(
                "keyvault.usage_flush_failed", resource=key.name, error=type(error).__name__
            )

    async def flush(self, slot: Slot, *, rotate: bool) -> bool:
        """Add the pending count of `slot` to the store's; rotate the key if the version is exhausted (True)."""
        count = self._pending.pop(slot, 0)
        if count == 0:
            return False
        name, version = slot
        try:
            total = await self._store.add_encryptions(name, version, count)
        except BaseException:
            self._pending[slot] = self._pending.get(slot, 0) + count
            raise
        self._known[slot] = total
        if total < self._max_encryptions or not rotate or self._sealing.sealed:
            return False
        self._access.log.warning(
            "keyvault.encryption_limit",
            caller=SYSTEM,
            resource=name,
            version=version,
            encryptions=total,
            limit=self._max_encryptions,
        )
        try:
            rotated = await self._rotate(name, version)
        except DomainError:  # logged; deleted meanwhile, or contended: the next count or check retries
            return False
        self._known.pop(slot, None)  # rotated now or before: the version takes no more encryptions
        return rotated

    async def flush_all(self) -> None:
        """Store every pending count without rotating (closing): a failure is logged, not raised."""
        for slot in list(self._pending):
            try:
                await self.flush(slot, rotate=False)
            except Exception as error:  # closing anyway: the count is a safety margin, not a record
                self._access.log.warning(
                    "keyvault.usage_flush_failed", resource=slot[0], error=type(error).__name__
                )

    def forget(self, name: str) -> None:
        """The key was deleted: drop its counts."""
        for slot in [s for s in (*self._pending, *self._known) if s[0] == name]:
            self._pending.pop(slot, None)
            self._known.pop(slot, None)
