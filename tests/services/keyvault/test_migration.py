"""Moving the key ring to another root: everything re-wrapped in one transaction, or nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.keyvault.core import KeyVault
from services.keyvault.errors import FailedPrecondition
from services.keyvault.migration import Migrated, NotThisRing, migrate_root
from services.keyvault.model import KeyType
from services.keyvault.root import ROOT_CHECK_META, LocalSealedRoot, Pkcs11Root, RootKey
from services.keyvault.store import RootChanged
from tests.support import open_database
from tradeguard.testing import FakeClock

from .conftest import SCRYPT_N, Backend, HookedStore

AES = KeyType.AES256_GCM


def _local(path: Path, passphrase: str) -> LocalSealedRoot:
    return LocalSealedRoot.create(path, passphrase, scrypt_n=SCRYPT_N)


async def _fill(backend: Backend, root: RootKey) -> dict[str, object]:
    """A ring with two AES versions, an HMAC key, a live and a destroyed secret version; what they give."""
    store = await backend.open()
    vault = KeyVault(store, clock=FakeClock(), root=root)
    await vault.start()
    await vault.create_key("ops", "credentials", AES)
    old_ct = await vault.encrypt("auth", "credentials", b"sealed under v1", b"ad")
    await vault.rotate_key("ops", "credentials")
    new_ct = await vault.encrypt("auth", "credentials", b"sealed under v2", b"ad")
    await vault.create_key("ops", "auth/api-signing", KeyType.HMAC_SHA256)
    mac = await vault.hmac("auth", "auth/api-signing", b"message")
    await vault.put_secret("auth", "alice", "auth/totp", b"first seed")
    await vault.put_secret("auth", "alice", "auth/totp", b"second seed")
    await vault.destroy_secret_version("auth", "alice", "auth/totp", 1)
    await vault.close()
    return {"old_ct": old_ct, "new_ct": new_ct, "mac": mac, "store": store}


async def _snapshot(backend: Backend) -> tuple[list[bytes], bytes | None, bytes | None]:
    """What the ring stores under the root: every wrapped blob and the root check."""
    store = await backend.open()
    keys = [await store.get_key(name) for name in ("credentials", "auth/api-signing")]
    secret = await store.get_secret_version("alice", "auth/totp", 2)
    assert secret is not None
    return (
        [v.wrapped for key in keys if key is not None for v in key.versions],
        secret.wrapped_data_key,
        await store.get_meta(ROOT_CHECK_META),
    )


async def _vault(backend: Backend, root: RootKey) -> KeyVault:
    vault = KeyVault(await backend.open(), clock=FakeClock(), root=root)
    await vault.start()
    return vault


async def _everything_opens(vault: KeyVault, ring: dict[str, object]) -> None:
    assert await vault.decrypt("auth", "credentials", str(ring["old_ct"]), b"ad") == b"sealed under v1"
    assert await vault.decrypt("auth", "credentials", str(ring["new_ct"]), b"ad") == b"sealed under v2"
    assert await vault.hmac("auth", "auth/api-signing", b"message") == ring["mac"]
    assert (await vault.get_secret("auth", "alice", "auth/totp"))[0] == b"second seed"


async def test_the_ring_moves_to_a_new_local_root(backend: Backend, tmp_path: Path) -> None:
    old = _local(tmp_path / "old.root", "old passphrase!")
    ring = await _fill(backend, old)
    old_blobs, old_data_key, old_check = await _snapshot(backend)
    new = _local(tmp_path / "new.root", "new passphrase!")

    assert await migrate_root(await backend.open(), old, new) == Migrated(versions=3, data_keys=1)

    vault = await _vault(backend, new)
    await _everything_opens(vault, ring)  # callers' ciphertexts and MACs are unchanged
    await vault.close()
    with pytest.raises(FailedPrecondition, match="not the one that wrapped"):
        await _vault(backend, old)  # the old root no longer opens the ring
    stored = backend.raw_bytes()  # SQLite: the file and its WAL, scrubbed; PostgreSQL: the live rows
    for blob in [*old_blobs, old_data_key, old_check]:
        assert isinstance(blob, bytes) and blob not in stored


async def test_a_failure_midway_changes_nothing(backend: Backend, tmp_path: Path) -> None:
    old = _local(tmp_path / "old.root", "old passphrase!")
    ring = await _fill(backend, old)
    before = await _snapshot(backend)

    class FailsOnThirdWrap:
        kind = "local"

        def __init__(self, inner: RootKey) -> None:
            self.inner, self.wraps = inner, 0

        def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes:
            self.wraps += 1
            if self.wraps == 3:
                raise OSError("the HSM went away")
            return self.inner.wrap(plaintext, associated_data)

        def unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
            return self.inner.unwrap(blob, associated_data)

        def accepts(self, secret: str) -> bool:
            return self.inner.accepts(secret)

        def close(self) -> None:
            self.inner.close()

    with pytest.raises(OSError, match="went away"):
        await migrate_root(
            await backend.open(), old, FailsOnThirdWrap(_local(tmp_path / "new.root", "x" * 12))
        )
    assert await _snapshot(backend) == before  # rolled back: not one blob re-wrapped
    vault = await _vault(backend, old)
    await _everything_opens(vault, ring)
    await vault.close()


async def test_a_wrong_old_root_is_refused(backend: Backend, tmp_path: Path) -> None:
    old = _local(tmp_path / "old.root", "old passphrase!")
    await _fill(backend, old)
    stranger = _local(tmp_path / "stranger.root", "old passphrase!")  # same passphrase, another key
    with pytest.raises(NotThisRing):
        await migrate_root(await backend.open(), stranger, _local(tmp_path / "new.root", "x" * 12))
    (tmp_path / "empty").mkdir()
    async with open_database(Backend, backend.kind, tmp_path / "empty") as empty:
        with pytest.raises(NotThisRing):  # an empty store has no ring to move
            await migrate_root(await empty.open(), old, stranger)


async def test_a_ring_that_moved_meanwhile_is_not_overwritten(backend: Backend, tmp_path: Path) -> None:
    """Two operators migrating at once: the second finds the root check changed and writes nothing."""
    old = _local(tmp_path / "old.root", "old passphrase!")
    ring = await _fill(backend, old)
    first = _local(tmp_path / "first.root", "x" * 12)
    store = HookedStore(await backend.open())

    async def the_other_operator() -> None:
        await migrate_root(await backend.open(), old, first)

    store.after["get_meta"] = the_other_operator
    with pytest.raises(RootChanged):
        await migrate_root(store, old, _local(tmp_path / "second.root", "y" * 12))  # type: ignore[arg-type]
    vault = await _vault(backend, first)  # the first migration stands, whole
    await _everything_opens(vault, ring)
    await vault.close()


async def test_the_ring_moves_into_an_hsm(softhsm: dict[str, str], tmp_path: Path) -> None:
    backend = Backend("sqlite", tmp_path)
    try:
        old = _local(tmp_path / "old.root", "old passphrase!")
        ring = await _fill(backend, old)
        hsm = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "tg-root")
        try:
            assert await migrate_root(await backend.open(), old, hsm) == Migrated(versions=3, data_keys=1)
            vault = await _vault(backend, hsm)
            await _everything_opens(vault, ring)
            assert vault.seal_status().root_kind == "pkcs11"
            await vault.close()
        finally:
            hsm.close()  # a second close is a no-op
    finally:
        await backend.aclose()


@pytest.mark.parametrize("write", ["create_key", "rotate_key", "put_secret", "decrypt", "get_secret"])
async def test_a_vault_left_on_the_old_root_writes_nothing_and_seals_itself(
    backend: Backend, tmp_path: Path, write: str
) -> None:
    """A replica nobody stopped: its next write of wrapped material, or its next load of a key or data key,
    finds the ring moved; it refuses with ROOT_KEY_MOVED and seals itself, never an opaque internal error."""
    old = _local(tmp_path / "old.root", "old passphrase!")
    ring = await _fill(backend, old)
    stale = await _vault(backend, LocalSealedRoot.unseal(tmp_path / "old.root", "old passphrase!"))
    new = _local(tmp_path / "new.root", "new passphrase!")
    await migrate_root(await backend.open(), old, new)
    before = await _snapshot_after_move(backend)

    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "create_key": lambda: stale.create_key("ops", "credentials-2", AES),
        "rotate_key": lambda: stale.rotate_key("ops", "credentials"),
        "put_secret": lambda: stale.put_secret("auth", "alice", "auth/totp", b"third seed"),
        "decrypt": lambda: stale.decrypt("auth", "credentials", str(ring["old_ct"]), b"ad"),
        "get_secret": lambda: stale.get_secret("auth", "alice", "auth/totp"),
    }
    with pytest.raises(FailedPrecondition) as refused:
        await attempts[write]()
    assert refused.value.reason == "ROOT_KEY_MOVED"
    assert stale.sealed  # fails closed: nothing more under the stale root
    await stale.close()
    assert await _snapshot_after_move(backend) == before  # nothing written
    vault = await _vault(backend, new)
    await _everything_opens(vault, ring)
    await vault.close()


async def _snapshot_after_move(backend: Backend) -> tuple[object, ...]:
    store = await backend.open()
    keys = [await store.get_key(name) for name in ("credentials", "credentials-2")]
    return (
        [[v.version for v in key.versions] if key else None for key in keys],
        [s.version for s in await store.list_secret_versions("alice", "auth/totp")],
    )
