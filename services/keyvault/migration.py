"""Moving the key ring to another root key: a fresh local root, or from the local root into an HSM.

Every key version's material and every live secret version's data key is unwrapped with the old root and
wrapped with the new one, and the store's root check is replaced, in ONE store transaction: if anything fails
(a blob that does not authenticate, the HSM, the database), nothing changed and the old root still opens
everything. Ciphertexts handed out to callers do not change: they are sealed under the keys, not the root.
Pure: no grpc, no files; `migrate_cmd` is the operator's command around it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.keyvault.keyring import material_ad
from services.keyvault.root import ROOT_CHECK_META, RootKey, matches_root_check, root_check
from services.keyvault.secret_store import data_key_ad
from services.keyvault.store import VaultStore

__all__ = ["Migrated", "NotThisRing", "migrate_root"]


class NotThisRing(Exception):
    """The old root key is not the one that wrapped this key ring (or the ring has no root yet)."""


@dataclass(frozen=True)
class Migrated:
    versions: int  # key versions re-wrapped
    data_keys: int  # secret data keys re-wrapped


async def migrate_root(store: VaultStore, old: RootKey, new: RootKey) -> Migrated:
    """Re-wrap the whole key ring of `store` from `old` to `new` (all or nothing)."""
    current = await store.get_meta(ROOT_CHECK_META)
    if current is None or not matches_root_check(old, current):
        raise NotThisRing("the current root key does not open this key ring")

    def material(name: str, version: int, wrapped: bytes) -> bytes:
        ad = material_ad(name, version)
        return new.wrap(old.unwrap(wrapped, ad), ad)

    def data_key(owner: str, path: str, version: int, wrapped: bytes) -> bytes:
        ad = data_key_ad(owner, path, version)
        return new.wrap(old.unwrap(wrapped, ad), ad)

    versions, data_keys = await store.rewrap_all(
        ROOT_CHECK_META, current, root_check(new), material, data_key
    )
    return Migrated(versions, data_keys)
