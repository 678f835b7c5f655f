"""The vault as a whole over real stores (SQLite and PostgreSQL): policy, restart, what the database and the log hold."""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from services.keyvault.core import KeyVault
from services.keyvault.errors import (
    Code,
    DecryptionFailed,
    NotFound,
    PermissionDenied,
)
from services.keyvault.model import KeyType, VersionRecord
from services.keyvault.root import LocalSealedRoot
from services.keyvault.store_sqlite import SqliteVaultStore
from tradeguard.observability.logging import configure_logging
from tradeguard.testing import FakeClock

from .conftest import AES, AUTH, OPS, PASSPHRASE, SCRYPT_N, TRADING, Backend, RecordingRandom, VaultFactory


async def test_permission_before_existence_and_deny_by_default(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "trading/orders", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"secret")
    # The trading service may seal credentials but never open them.
    assert (await vault.encrypt(TRADING, "credentials", b"x")).startswith("tgv1:credentials:")
    for caller in (TRADING, "monitor", "", None, "ops"):
        with pytest.raises(PermissionDenied) as info:
            await vault.decrypt(caller, "credentials", ct)
        assert info.value.code is Code.PERMISSION_DENIED
    # A missing key answers PERMISSION_DENIED, not NOT_FOUND, to a caller without the right.
    with pytest.raises(PermissionDenied):
        await vault.decrypt(TRADING, "credentials-missing", ct)
    with pytest.raises(NotFound):
        await vault.decrypt(AUTH, "credentials-missing", ct)
    with pytest.raises(PermissionDenied):
        await vault.create_key(AUTH, "credentials-2", AES)  # only ops administers
    with pytest.raises(PermissionDenied):
        await vault.encrypt(AUTH, "trading/orders", b"x")
    with pytest.raises(PermissionDenied):
        await vault.rewrap(TRADING, "credentials", ct)
    with pytest.raises(PermissionDenied):
        await vault.generate_data_key(TRADING, "credentials")
    with pytest.raises(PermissionDenied):
        await vault.get_secret(TRADING, "alice", "auth/totp")
    with pytest.raises(PermissionDenied):
        await vault.get_secret(OPS, "alice", "auth/totp")  # operators never read secrets
    keys, token = await vault.list_keys(AUTH, 0, "")
    assert keys == [] and token == ""
    keys, _ = await vault.list_keys(OPS, 0, "")
    assert [k.config.name for k in keys] == ["credentials", "trading/orders"]


async def test_restart_keeps_every_key_and_secret(vaults: VaultFactory) -> None:
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "auth/jwt", KeyType.ED25519)
    await vault.create_key(OPS, "auth/api-key-ids", KeyType.HMAC_SHA256)
    ct1 = await vault.encrypt(AUTH, "credentials", b"first", b"ad")
    await vault.rotate_key(OPS, "credentials")
    ct2 = await vault.encrypt(AUTH, "credentials", b"second", b"ad")
    signature = await vault.sign(AUTH, "auth/jwt", b"header.payload")
    mac = await vault.hmac(AUTH, "auth/api-key-ids", b"key-id-1")
    await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-1")
    await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-2")
    await vault.close()

    again = await vaults.open()
    assert await again.decrypt(AUTH, "credentials", ct1, b"ad") == b"first"
    assert await again.decrypt(AUTH, "credentials", ct2, b"ad") == b"second"
    assert await again.verify(AUTH, "auth/jwt", b"header.payload", signature)
    assert await again.hmac(AUTH, "auth/api-key-ids", b"key-id-1") == mac
    assert (await again.get_secret(AUTH, "alice", "auth/totp"))[0] == b"seed-2"
    assert (await again.get_secret(AUTH, "alice", "auth/totp", 1))[0] == b"seed-1"
    assert (await again.get_key(OPS, "credentials")).latest.version == 2


async def test_database_holds_no_plaintext_and_no_key_material(
    vaults: VaultFactory, backend: Backend, random: RecordingRandom
) -> None:
    vault = await vaults.open()
    known = b"KNOWN-PLAINTEXT-4f1d9a7c"
    secret = b"KNOWN-SECRET-VALUE-77e3b1"
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "auth/jwt", KeyType.ED25519)
    await vault.create_key(OPS, "auth/hmac", KeyType.HMAC_SHA256)
    for _ in range(3):
        await vault.rotate_key(OPS, "credentials")
    await vault.encrypt(AUTH, "credentials", known, b"ad")
    await vault.put_secret(AUTH, "alice", "auth/totp", secret)
    await vault.put_secret(AUTH, "alice", "auth/totp", secret + b"-2")
    await vault.destroy_secret_version(AUTH, "alice", "auth/totp", 1)
    data = backend.raw_bytes()
    assert len(data) > 1000
    assert b"credentials" in data  # metadata is in clear: the search does look at the data
    for needle in (known, secret, secret + b"-2", b"KNOWN-"):
        assert needle not in data
    # No key material, root key or data key the vault ever drew from its random source.
    material = [value for value in random.outputs if len(value) == 32]
    assert len(material) >= 8
    for value in material:
        assert value not in data
        assert value.hex().encode() not in data


async def test_every_operation_is_logged_without_material(vault: KeyVault) -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out, level="debug")
    try:
        await vault.create_key(OPS, "credentials", AES)
        ct = await vault.encrypt(AUTH, "credentials", b"PLAINTEXT-MARKER", b"AD-MARKER")
        await vault.decrypt(AUTH, "credentials", ct, b"AD-MARKER")
        with pytest.raises(DecryptionFailed):
            await vault.decrypt(AUTH, "credentials", ct, b"AD-MARKER-WRONG")
        with pytest.raises(PermissionDenied):
            await vault.decrypt(TRADING, "credentials", ct)
        await vault.put_secret(AUTH, "alice", "auth/totp", b"SECRET-MARKER")
        await vault.get_secret(AUTH, "alice", "auth/totp")
    finally:
        configure_logging(json=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    events = [(e["event"], e.get("outcome")) for e in lines]
    assert ("keyvault.create_key", "ok") in events
    assert ("keyvault.encrypt", "ok") in events
    assert ("keyvault.decrypt", "ok") in events
    assert ("keyvault.decrypt", "failed") in events
    assert ("keyvault.decrypt", "permission_denied") in events
    assert ("keyvault.get_secret", "ok") in events
    text = out.getvalue()
    body = ct.rsplit(":", 1)[1]
    for marker in ("PLAINTEXT-MARKER", "AD-MARKER", "SECRET-MARKER", body, body[:16]):
        assert marker not in text


async def test_store_writes_are_compare_and_swap_and_all_or_nothing(
    vaults: VaultFactory, backend: Backend, clock: FakeClock
) -> None:
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    await vault.rotate_key(OPS, "credentials")
    store = await backend.open()
    before = await store.get_key("credentials")
    assert before is not None
    assert await store.key_stamp("credentials") == (before.config.create_us, before.config.update_us)
    assert await store.key_stamp("missing") is None
    # A configuration written from a stale read changes nothing.
    stale = replace(before.config, min_decryption_version=2, deletion_allowed=True)
    assert await store.update_config(stale, before.config.update_us - 1) is None
    assert await store.get_key("credentials") == before
    # A version that is not the next one (a lost rotation race) writes nothing, not even update_us; nor does
    # the next version on a key changed since it was read (its configuration would be cached as unchanged).
    stamp = before.config.update_us
    for version, expected in ((2, stamp), (4, stamp), (3, stamp - 1)):
        record = VersionRecord(version, b"wrapped", b"", clock() + 5)
        assert await store.add_version("credentials", record, clock() + 5, expected) is None
        assert await store.get_key("credentials") == before
    assert await store.add_version("missing", VersionRecord(1, b"w", b"", 1), 1, 1) is None
    # update_us only grows, even when the clock does not move.
    first = await store.update_config(stale, before.config.update_us)
    assert first is not None and first > before.config.update_us
    second = await store.add_version("credentials", VersionRecord(3, b"w", b"", clock()), clock(), first)
    assert second is not None and second > first


async def test_sqlite_files_are_owner_only_and_keep_no_destroyed_secret(
    tmp_path: Path, clock: FakeClock, random: RecordingRandom
) -> None:
    """After DestroySecretVersion (and DeleteKey) neither the database nor its -wal and -shm files, read while
    the store is open, hold the sealed value or its wrapped data key; every file is 0600."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "kv.db"
        store = await SqliteVaultStore.open(path)
        root = LocalSealedRoot.create(tmp_path / "root", PASSPHRASE, random, scrypt_n=SCRYPT_N)
        vault = KeyVault(store, clock=clock, random=random, root=root)
        await vault.start()
        await vault.put_secret(AUTH, "u1", "auth/totp", b"S" * 64)
        await vault.put_secret(AUTH, "u1", "auth/totp", b"T" * 64)
        await vault.create_key(OPS, "doomed", AES, deletion_allowed=True)
        destroyed = await store.get_secret_version("u1", "auth/totp", 1)
        kept = await store.get_secret_version("u1", "auth/totp", 2)
        doomed = await store.get_key("doomed")
        assert destroyed is not None and kept is not None and doomed is not None
        assert kept.ciphertext is not None and destroyed.ciphertext is not None
        assert destroyed.wrapped_data_key is not None

        def files() -> dict[str, bytes]:
            return {p.name: p.read_bytes() for p in sorted(tmp_path.glob("kv.db*"))}

        assert any(kept.ciphertext in data for data in files().values())  # the search does see live data
        await vault.destroy_secret_version(OPS, "u1", "auth/totp", 1)
        await vault.delete_key(OPS, "doomed")
        found = files()
        assert set(found) == {"kv.db", "kv.db-wal", "kv.db-shm"}
        for name, data in found.items():
            assert destroyed.ciphertext not in data, name
            assert destroyed.wrapped_data_key not in data, name
            assert doomed.versions[0].wrapped not in data, name
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        assert (await vault.get_secret(AUTH, "u1", "auth/totp"))[0] == b"T" * 64
        await vault.close()
        await store.close()
        # Files of an older, looser deployment are tightened when opened.
        path.chmod(0o644)
        store = await SqliteVaultStore.open(path)
        await store.put_meta_if_absent("probe", b"x")
        for p in tmp_path.glob("kv.db*"):  # noqa: ASYNC240 - a listing of the test's own tmp_path
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
        await store.close()
    finally:
        os.umask(old_umask)
