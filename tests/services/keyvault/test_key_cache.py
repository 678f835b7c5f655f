"""The key cache (key_cache.py): replicas sharing a store, the freshness window, stamps, racing loads."""

from __future__ import annotations

import asyncio

import pytest

from services.keyvault.errors import (
    DecryptionFailed,
    NotFound,
    Unavailable,
)
from services.keyvault.model import KeyType
from tradeguard.errors import DomainError
from tradeguard.testing import FakeClock

from .conftest import AES, AUTH, FRESHNESS_US, OPS, HookedStore, VaultFactory, decrypt_fails, wrap_hooked


async def test_replicas_sharing_a_store_see_each_others_changes_at_once(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """With a freshness window of 0, a rotation, a raised min_decryption_version or a deletion on replica A
    holds on replica B from B's very next operation (B had the key cached)."""
    a = await vaults.open(key_freshness_us=0)
    await a.create_key(OPS, "credentials", AES)
    await a.create_key(OPS, "auth/ids", KeyType.HMAC_SHA256)
    await a.create_key(OPS, "auth/jwt", KeyType.ED25519)
    b = await vaults.open(key_freshness_us=0)
    ct_v1 = await b.encrypt(AUTH, "credentials", b"old", b"ad")  # B caches every key
    sig_v1 = await b.sign(AUTH, "auth/jwt", b"m")
    assert (await b.hmac(AUTH, "auth/ids", b"x")).startswith("tgv1:auth/ids:v1:")
    clock.advance(1000)
    await a.rotate_key(OPS, "credentials")
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)
    assert "below min_decryption_version" in (await decrypt_fails(a, "credentials", ct_v1, b"ad")).cause
    assert "below min_decryption_version" in (await decrypt_fails(b, "credentials", ct_v1, b"ad")).cause
    with pytest.raises(DecryptionFailed):
        await b.rewrap(AUTH, "credentials", ct_v1, b"ad")
    failed = (await b.batch_decrypt(AUTH, "credentials", [(ct_v1, b"ad")]))[0]
    assert isinstance(failed, DomainError) and failed.message == "decryption failed"
    # B encrypts under the new version only: nothing A refuses.
    ct_b = await b.encrypt(AUTH, "credentials", b"new", b"ad")
    assert ct_b.startswith("tgv1:credentials:v2:")
    assert await a.decrypt(AUTH, "credentials", ct_b, b"ad") == b"new"
    assert (await b.generate_data_key(AUTH, "credentials")).wrapped.startswith("tgv1:credentials:v2:")
    assert str((await b.batch_encrypt(AUTH, "credentials", [(b"x", b"")]))[0]).startswith(
        "tgv1:credentials:v2:"
    )
    # HMAC and signing keys likewise.
    await a.rotate_key(OPS, "auth/ids")
    assert (await b.hmac(AUTH, "auth/ids", b"x")).startswith("tgv1:auth/ids:v2:")
    await a.rotate_key(OPS, "auth/jwt")
    await a.update_key_config(OPS, "auth/jwt", min_decryption_version=2)
    assert not await b.verify(AUTH, "auth/jwt", b"m", sig_v1)
    assert (await b.sign(AUTH, "auth/jwt", b"m")).startswith("tgv1:auth/jwt:v2:")
    # Deleted on A: B refuses at once; created again under the name: B uses the new key's material.
    ct_b = await b.encrypt(AUTH, "credentials", b"new", b"ad")
    clock.advance(1000)
    await a.update_key_config(OPS, "credentials", deletion_allowed=True)
    await a.delete_key(OPS, "credentials")
    with pytest.raises(NotFound):
        await b.encrypt(AUTH, "credentials", b"x")
    with pytest.raises(NotFound):
        await b.decrypt(AUTH, "credentials", ct_b, b"ad")
    await a.create_key(OPS, "credentials", AES)
    again = await b.encrypt(AUTH, "credentials", b"again")
    assert await a.decrypt(AUTH, "credentials", again) == b"again"
    await decrypt_fails(b, "credentials", ct_b, b"ad")  # the old key's ciphertext: another key now


@pytest.mark.parametrize("freshness_us", [0, FRESHNESS_US])
async def test_a_recreated_key_is_never_mixed_with_the_cached_one(
    vaults: VaultFactory, clock: FakeClock, freshness_us: int
) -> None:
    a = await vaults.open(key_freshness_us=freshness_us)
    await a.create_key(OPS, "credentials", AES, deletion_allowed=True)
    b = await vaults.open(key_freshness_us=freshness_us)
    old = await b.encrypt(AUTH, "credentials", b"old")
    clock.advance(1)
    await a.delete_key(OPS, "credentials")
    await a.create_key(OPS, "credentials", AES)  # B still holds the deleted key's v1 in memory
    clock.advance(freshness_us)  # B's cache is past its window (the documented bound for re-created names)
    new = await b.encrypt(AUTH, "credentials", b"new")
    assert await a.decrypt(AUTH, "credentials", new) == b"new"
    await decrypt_fails(b, "credentials", old)


async def test_a_load_racing_a_local_rotation_returns_the_rotation(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    hooked: list[HookedStore] = []
    vault = await vaults.open(wrap=wrap_hooked(hooked))
    await vault.create_key(OPS, "credentials", AES)
    other = await vaults.open()
    await other.rotate_key(OPS, "credentials")
    clock.advance(FRESHNESS_US)  # the vault's cached key is stale and past its window: its next use reloads
    # While that reload is in flight the vault rotates the key itself; the load must not win over it.
    hooked[0].after["get_key"] = lambda: vault.rotate_key(OPS, "credentials")
    ct = await vault.encrypt(AUTH, "credentials", b"x")
    assert ct.startswith("tgv1:credentials:v3:")
    assert (await vault.encrypt(AUTH, "credentials", b"y")).startswith("tgv1:credentials:v3:")


async def test_a_replica_trusts_its_cached_key_for_the_freshness_window_then_sees_changes(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """Within the window B serves from its cache without a single store read (it may still use v1 that A has
    rotated away from); from the window's end B's next use reads the stamp once, sees A's rotation and
    reloads. Concurrent uses after the window share one stamp read."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=wrap_hooked(hooked))
    calls = hooked[0].calls
    ct_v1 = await b.encrypt(AUTH, "credentials", b"v1", b"ad")  # B loads the key, confirmed now (T0)
    assert (calls["get_key"], calls["key_stamp"]) == (1, 0)
    clock.advance(1000)
    await a.rotate_key(OPS, "credentials")  # v2 exists from T0 + 1 ms
    for step in (0, FRESHNESS_US - 1000 - 1):  # (a) up to the last microsecond of the window
        clock.advance(step)
        assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v1:")
        assert await b.decrypt(AUTH, "credentials", ct_v1, b"ad") == b"v1"
    assert (calls["get_key"], calls["key_stamp"]) == (1, 0)  # not one store read
    clock.advance(1)  # (b) the window is over: one stamp read, which shows A's rotation, and a reload
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert (calls["get_key"], calls["key_stamp"]) == (2, 1)
    for _ in range(3):  # a new window from the reload
        assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert (calls["get_key"], calls["key_stamp"]) == (2, 1)
    clock.advance(FRESHNESS_US)  # unchanged in the store: 32 concurrent uses cost one stamp read, no load
    sealed = await asyncio.gather(*(b.encrypt(AUTH, "credentials", b"%d" % i) for i in range(32)))
    assert all(ct.startswith("tgv1:credentials:v2:") for ct in sealed)
    assert (calls["get_key"], calls["key_stamp"]) == (2, 2)
    # A ciphertext of a version B lacks is never refused for being new: B reloads at once, in the window.
    clock.advance(1000)
    await a.rotate_key(OPS, "credentials")
    ct_v3 = await a.encrypt(AUTH, "credentials", b"v3")
    assert await b.decrypt(AUTH, "credentials", ct_v3) == b"v3"
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v3:")


async def test_freshness_zero_reads_the_stamp_before_every_use_and_retires_at_once(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """(d) key_freshness_us=0 is the strict mode: a stamp read per operation, every change visible on the next
    operation, and versions may be retired as soon as they exist."""
    a = await vaults.open(key_freshness_us=0)
    await a.create_key(OPS, "credentials", AES)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=wrap_hooked(hooked), key_freshness_us=0)
    calls = hooked[0].calls
    ct_v1 = await b.encrypt(AUTH, "credentials", b"v1")
    for _ in range(5):
        await b.encrypt(AUTH, "credentials", b"x")
    assert (calls["get_key"], calls["key_stamp"]) == (1, 5)  # the clock never moved: still read every time
    await a.rotate_key(OPS, "credentials")
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)  # at once
    await decrypt_fails(b, "credentials", ct_v1)
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert calls["key_stamp"] == 7


async def test_a_stamp_read_slower_than_the_window_is_not_trusted(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """A confirmation counts from when its read began: a read that outlasts the window is read again, and a
    store that is always that slow makes the operation fail UNAVAILABLE rather than use an unconfirmed key."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=wrap_hooked(hooked))
    calls = hooked[0].calls
    await b.encrypt(AUTH, "credentials", b"x")
    clock.advance(FRESHNESS_US)

    async def slow() -> None:
        clock.advance(FRESHNESS_US)

    hooked[0].after["key_stamp"] = slow  # once: the second read is quick
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v1:")
    assert calls["key_stamp"] == 2

    async def always_slow() -> None:
        clock.advance(FRESHNESS_US)
        hooked[0].after["key_stamp"] = always_slow

    clock.advance(FRESHNESS_US)
    hooked[0].after["key_stamp"] = always_slow
    with pytest.raises(Unavailable) as info:
        await b.encrypt(AUTH, "credentials", b"x")
    assert info.value.reason == "KEY_STORE_SLOW"
    assert calls["key_stamp"] == 5
    with pytest.raises(ValueError):
        await vaults.open(key_freshness_us=-1)


async def test_a_rotation_never_caches_a_configuration_changed_concurrently(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """B reads the key to rotate it, A raises min_decryption_version, B appends its version: the append is
    compare-and-swap on update_us, so B retries on the new state rather than cache the old minimum under the
    store's new stamp (which no later stamp read would ever catch)."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    ct_v1 = await a.encrypt(AUTH, "credentials", b"v1")
    await a.rotate_key(OPS, "credentials")
    clock.advance(FRESHNESS_US)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=wrap_hooked(hooked))
    hooked[0].after["get_key"] = lambda: a.update_key_config(OPS, "credentials", min_decryption_version=2)
    info = await b.rotate_key(OPS, "credentials")
    assert info.latest.version == 3 and info.config.min_decryption_version == 2
    assert hooked[0].calls["add_version"] == 2  # the first append lost the race
    await decrypt_fails(b, "credentials", ct_v1)
    clock.advance(FRESHNESS_US)
    await decrypt_fails(b, "credentials", ct_v1)
    assert await b.get_key(OPS, "credentials") == await a.get_key(OPS, "credentials")
