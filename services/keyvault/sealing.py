"""Sealing: the root key the vault works under, how it is installed, unsealed, sealed and fenced.

The vault is sealed until it holds a root key: given at start (`start`), or unsealed by an operator's passphrase
or PIN (`unseal`, through an injected blocking `unsealer` run off the event loop). A root is installed only if it
matches the key ring's root check (written by the first root). Whenever the root changes, every cache of
unwrapped material is dropped (`on_change`). If the ring moves to another root (a migration by another replica
or an operator), this vault's root is stale: it seals itself (fail closed) and refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.keyvault.access import SYSTEM, Access
from services.keyvault.errors import FailedPrecondition, InvalidArgument, unseal_failed, vault_sealed
from services.keyvault.model import SealStatus
from services.keyvault.policy import Operation
from services.keyvault.root import ROOT_CHECK_META, RootKey, WrongPassphrase, matches_root_check, root_check
from services.keyvault.store import RootChanged, VaultStore

__all__ = ["Sealing", "Unsealer"]

T = TypeVar("T")

Unsealer = Callable[[str], RootKey]
"""Passphrase or PIN → the root key. Blocking (scrypt, PKCS#11 login): run off the event loop."""


class Sealing:
    def __init__(
        self,
        store: VaultStore,
        access: Access,
        *,
        root: RootKey | None = None,
        unsealer: Unsealer | None = None,
        root_kind: str = "local",
    ) -> None:
        self._store = store
        self._access = access
        self._root: RootKey | None = None
        self._pending_root = root
        self._unsealer = unsealer
        self._root_kind = root.kind if root is not None else root_kind
        self._unseal_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, forget: Callable[[], None]) -> None:
        """Call `forget` whenever the root is installed or dropped (caches of unwrapped material)."""
        self._listeners.append(forget)

    def _changed(self) -> None:
        for forget in self._listeners:
            forget()

    async def start(self) -> None:
        """Install the root key given at construction (if any): the vault starts unsealed."""
        root, self._pending_root = self._pending_root, None
        if root is not None:
            await self._install(root)
            self._access.log.info("keyvault.unsealed", root_kind=root.kind, caller=SYSTEM)

    @property
    def sealed(self) -> bool:
        return self._root is None

    @property
    def root(self) -> RootKey | None:
        return self._root

    def status(self) -> SealStatus:
        return SealStatus(sealed=self._root is None, root_kind=self._root_kind)

    def require(self) -> RootKey:
        """The root key, or UNAVAILABLE (VAULT_SEALED)."""
        root = self._root
        if root is None:
            raise vault_sealed()
        return root

    async def unseal(self, caller: str | None, passphrase: str) -> SealStatus:
        """Unseal with the passphrase (or PIN). The passphrase is checked whether or not the vault is unsealed
        already: a wrong one gets the same refusal either way, a right one on an unsealed vault a plain OK."""
        if not passphrase:
            raise InvalidArgument.field("passphrase", "is required")
        self._access.authorize(caller, Operation.UNSEAL, "vault")
        async with self._unseal_lock:
            current = self._root
            if current is not None:
                if not await asyncio.to_thread(current.accepts, passphrase):
                    self._access.record("unseal", caller, warning=True, outcome="wrong_passphrase")
                    raise unseal_failed()
                self._access.record("unseal", caller, outcome="already_unsealed", root_kind=current.kind)
                return self.status()
            if self._unsealer is None:
                raise FailedPrecondition("this vault cannot be unsealed by passphrase", reason="NO_UNSEALER")
            try:
                root = await asyncio.to_thread(self._unsealer, passphrase)
            except WrongPassphrase:
                self._access.record("unseal", caller, warning=True, outcome="wrong_passphrase")
                raise unseal_failed() from None
            await self._install(root)
        self._access.record("unseal", caller, outcome="ok", root_kind=root.kind)
        return self.status()

    async def _install(self, root: RootKey) -> None:
        """Check `root` against the key ring's root check (written by the first root) and use it."""
        stored = await self._store.put_meta_if_absent(ROOT_CHECK_META, root_check(root))
        if not matches_root_check(root, stored):
            root.close()
            raise FailedPrecondition(
                "this root key is not the one that wrapped the key ring", reason="ROOT_KEY_MISMATCH"
            )
        self._store.fence(ROOT_CHECK_META, stored)  # no new material under this root once the ring moves
        self._changed()
        self._root = root
        self._root_kind = root.kind

    async def fenced(self, write: Awaitable[T]) -> T:
        """A write of wrapped material. If the ring moved to another root (another replica or operator ran a
        migration), this vault's root is stale: it seals itself (fail closed) and the write is refused."""
        try:
            return await write
        except RootChanged:
            raise self._moved() from None

    async def refuse_if_ring_moved(self) -> None:
        """After stored material failed to unwrap: if the ring now belongs to another root, seal and refuse."""
        root = self._root
        check = await self._store.get_meta(ROOT_CHECK_META)
        if root is not None and check is not None and not matches_root_check(root, check):
            raise self._moved()

    def _moved(self) -> FailedPrecondition:
        self.seal()
        return FailedPrecondition(
            "the key ring has moved to another root key; this vault sealed itself: restart it with the new root",
            reason="ROOT_KEY_MOVED",
        )

    def seal(self) -> None:
        """Forget the root key and every unwrapped key (operators' emergency stop, and tests)."""
        root, self._root = self._root, None
        self._changed()
        if root is not None:
            root.close()
        self._access.log.info("keyvault.sealed", caller=SYSTEM)

    def close(self) -> None:
        """Close the root key and drop every unwrapped key, without a log line (shutdown)."""
        if self._root is not None:
            self._root.close()
            self._root = None
        self._changed()
