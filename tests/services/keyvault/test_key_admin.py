"""Key administration (key_admin.py): rotation, rewrap, configuration, deletion, listing, scheduled rotation."""

from __future__ import annotations

import asyncio

import pytest

from services.keyvault.core import KeyVault
from services.keyvault.errors import (
    Code,
    DecryptionFailed,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.keyvault.policy import DEFAULT_POLICY, Operation, Policy, Rule
from tradeguard.testing import FakeClock

from .conftest import (
    AES,
    AUTH,
    FRESHNESS_US,
    HOUR_US,
    OPS,
    TRADING,
    HookedStore,
    VaultFactory,
    decrypt_fails,
    version_of,
    wrap_hooked,
)


async def test_rotation_min_decryption_version_and_rewrap(vault: KeyVault, clock: FakeClock) -> None:
    await vault.create_key(OPS, "credentials", AES)
    v1 = await vault.encrypt(AUTH, "credentials", b"one", b"ad")
    info = await vault.rotate_key(OPS, "credentials")
    assert info.latest.version == 2
    v2 = await vault.encrypt(AUTH, "credentials", b"two", b"ad")
    assert v2.startswith("tgv1:credentials:v2:")
    assert await vault.decrypt(AUTH, "credentials", v1, b"ad") == b"one"
    rewrapped = await vault.rewrap(AUTH, "credentials", v1, b"ad")
    assert rewrapped.startswith("tgv1:credentials:v2:")
    await decrypt_fails(vault, "credentials", rewrapped, b"other-ad")
    with pytest.raises(InvalidArgument):
        await vault.update_key_config(OPS, "credentials", min_decryption_version=3)
    with pytest.raises(FailedPrecondition) as too_new:  # v2 is younger than the freshness window (1 s)
        await vault.update_key_config(OPS, "credentials", min_decryption_version=2)
    assert too_new.value.reason == "VERSION_TOO_NEW"
    clock.advance(FRESHNESS_US)
    await vault.update_key_config(OPS, "credentials", min_decryption_version=2)
    assert (await vault.get_key(OPS, "credentials")).config.min_decryption_version == 2
    error = await decrypt_fails(vault, "credentials", v1, b"ad")  # below the minimum: same opaque error
    assert "below min_decryption_version" in error.cause
    with pytest.raises(DecryptionFailed):
        await vault.rewrap(AUTH, "credentials", v1, b"ad")
    assert await vault.decrypt(AUTH, "credentials", rewrapped, b"ad") == b"one"
    assert await vault.decrypt(AUTH, "credentials", v2, b"ad") == b"two"


async def test_rotation_and_rewrap_under_concurrent_encryption_lose_nothing(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    sealed: list[tuple[bytes, bytes, str]] = []  # (plaintext, associated data, ciphertext)
    rotating = True

    async def encryptor(worker: int) -> None:
        n = 0
        while rotating or n < 5:
            plaintext, ad = f"value-{worker}-{n}".encode(), f"{worker}/{n}".encode()
            sealed.append((plaintext, ad, await vault.encrypt(AUTH, "credentials", plaintext, ad)))
            n += 1
            await asyncio.sleep(0)  # yield to the rotation (no wall-clock sleeping)

    async def rotate(times: int) -> None:
        nonlocal rotating
        try:
            for _ in range(times):
                await vault.rotate_key(OPS, "credentials")
        finally:
            rotating = False

    await asyncio.gather(rotate(10), *(encryptor(w) for w in range(32)))
    versions = {version_of(ct) for _, _, ct in sealed}
    assert len(sealed) >= 32 * 5 and len(versions) >= 5  # encryption really ran across the rotations
    # Rewrap everything concurrently with more rotations; then every old and new ciphertext decrypts.
    rotating = True
    rewrapped, _ = await asyncio.gather(
        asyncio.gather(*(vault.rewrap(AUTH, "credentials", ct, ad) for _, ad, ct in sealed)), rotate(10)
    )
    for (plaintext, ad, ct), new in zip(sealed, rewrapped, strict=True):
        assert await vault.decrypt(AUTH, "credentials", ct, ad) == plaintext
        assert await vault.decrypt(AUTH, "credentials", new, ad) == plaintext
    assert (await vault.get_key(OPS, "credentials")).latest.version == 21


async def test_concurrent_rotations_by_two_replicas(vaults: VaultFactory) -> None:
    """Two vault processes over one database rotate at once: versions stay dense, both decrypt everything."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    b = await vaults.open()
    await asyncio.gather(*(v.rotate_key(OPS, "credentials") for v in (a, b) for _ in range(5)))
    info = await a.get_key(OPS, "credentials")
    assert [v.version for v in info.versions] == list(range(1, 12))
    ct_b = await b.encrypt(AUTH, "credentials", b"from b")
    assert await a.decrypt(AUTH, "credentials", ct_b) == b"from b"  # a reloads the newer version it lacked


async def test_automatic_rotation_with_fake_clock(vault: KeyVault, clock: FakeClock) -> None:
    await vault.create_key(OPS, "credentials", AES, auto_rotate_period_us=24 * HOUR_US)
    await vault.create_key(OPS, "static", AES)
    clock.advance(23 * HOUR_US)
    assert await vault.rotate_due() == []
    clock.advance(HOUR_US)
    assert await vault.rotate_due() == ["credentials"]
    assert await vault.rotate_due() == []
    assert (await vault.get_key(OPS, "credentials")).latest.version == 2
    assert (await vault.get_key(OPS, "static")).latest.version == 1
    await vault.update_key_config(OPS, "credentials", auto_rotate_period_us=0)
    clock.advance(100 * HOUR_US)
    assert await vault.rotate_due() == []


async def test_deletion_only_when_allowed(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    with pytest.raises(FailedPrecondition) as info:
        await vault.delete_key(OPS, "credentials")
    assert info.value.reason == "DELETION_NOT_ALLOWED"
    await vault.update_key_config(OPS, "credentials", deletion_allowed=True)
    await vault.delete_key(OPS, "credentials")
    with pytest.raises(NotFound):
        await vault.get_key(OPS, "credentials")
    with pytest.raises(NotFound):
        await vault.encrypt(AUTH, "credentials", b"x")


async def test_create_key_validation(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    with pytest.raises(DomainError) as info:
        await vault.create_key(OPS, "credentials", AES)
    assert info.value.reason == "KEY_EXISTS"
    for bad in ("", "Credentials", "a:b", "-x", "x" * 129, "with space"):
        with pytest.raises(InvalidArgument):
            await vault.create_key(OPS, bad, AES)
    with pytest.raises(InvalidArgument):
        await vault.create_key(OPS, "k", AES, auto_rotate_period_us=-1)


async def test_config_change_never_overwrites_a_concurrent_one(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """B reads the key, A raises min_decryption_version, B writes: B's write is retried on the new state."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    await a.rotate_key(OPS, "credentials")
    clock.advance(FRESHNESS_US)  # v2 may now retire v1
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=wrap_hooked(hooked))
    hooked[0].after["get_key"] = lambda: a.update_key_config(OPS, "credentials", min_decryption_version=2)
    info = await b.update_key_config(OPS, "credentials", deletion_allowed=True)
    assert info.config.min_decryption_version == 2 and info.config.deletion_allowed
    stored = await a.get_key(OPS, "credentials")
    assert stored.config.min_decryption_version == 2 and stored.config.deletion_allowed


async def test_automatic_rotation_once_per_period_across_replicas(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES, auto_rotate_period_us=24 * HOUR_US)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=wrap_hooked(hooked))
    clock.advance(24 * HOUR_US)
    hooked[0].after["list_keys"] = a.rotate_due  # A rotates after B found the key due
    assert await b.rotate_due() == []
    assert (await a.get_key(OPS, "credentials")).latest.version == 2
    clock.advance(24 * HOUR_US)
    results = await asyncio.gather(a.rotate_due(), b.rotate_due(), a.rotate_due(), b.rotate_due())
    assert sorted(name for r in results for name in r) == ["credentials"]
    assert (await b.get_key(OPS, "credentials")).latest.version == 3


async def test_list_keys_page_tokens_name_only_keys_the_caller_may_read(vaults: VaultFactory) -> None:
    names = ["audit/tree", "auth/jwt", "credentials", "secret-admin-key", "trading/a", "trading/b", "zzz"]
    policy = Policy(
        [*DEFAULT_POLICY.rules, Rule("key/trading/*", frozenset({Operation.READ_KEY}), frozenset({TRADING}))]
    )
    vault = await vaults.open(policy=policy)
    for name in names:
        await vault.create_key(OPS, name, AES)

    async def pages(caller: str, size: int) -> tuple[list[list[str]], list[str]]:
        out: list[list[str]] = []
        tokens: list[str] = []
        token = ""
        while True:
            keys, token = await vault.list_keys(caller, size, token)
            out.append([k.config.name for k in keys])
            if not token:
                return out, tokens
            tokens.append(token)
            assert len(tokens) < 20

    seen, tokens = await pages(TRADING, 1)
    assert [n for page in seen for n in page] == ["trading/a", "trading/b"]
    assert all(t.startswith("trading/") for t in tokens)
    seen, tokens = await pages(AUTH, 1)  # reads only its own auth/* keys (the JWT key's public versions)
    assert [n for page in seen for n in page] == ["auth/jwt"] and tokens == ["auth/jwt"]
    seen, tokens = await pages("monitor", 1)  # may read nothing: no token at all
    assert seen == [[]] and tokens == []
    for size in (1, 2, 3, 100):
        seen, _ = await pages(OPS, size)
        assert [n for page in seen for n in page] == names


async def test_auto_rotate_period_is_bounded(vault: KeyVault) -> None:
    for bad in (1, 30 * 60 * 1_000_000, 11 * 366 * 24 * HOUR_US, 2**62 * 1_000_000):
        with pytest.raises(InvalidArgument) as info:
            await vault.create_key(OPS, "k", AES, auto_rotate_period_us=bad)
        assert info.value.violations[0].field == "auto_rotate_period"
    await vault.create_key(OPS, "k", AES, auto_rotate_period_us=HOUR_US)
    await vault.create_key(OPS, "k2", AES, auto_rotate_period_us=0)
    with pytest.raises(InvalidArgument) as info:
        await vault.update_key_config(OPS, "k", auto_rotate_period_us=2**62)
    assert info.value.violations[0].field == "auto_rotate_period"
    info2 = await vault.update_key_config(OPS, "k", auto_rotate_period_us=3653 * 24 * HOUR_US)
    assert info2.config.auto_rotate_period_us == 3653 * 24 * HOUR_US


async def test_retiring_versions_waits_until_no_replica_can_encrypt_under_them(
    vaults: VaultFactory, clock: FakeClock
) -> None:
    """(c) min_decryption_version may be raised to N only once N is a whole window old: by then every replica's
    cache holds N. A stale replica may go on opening retired versions for at most one window after the raise
    (the documented bound); it never seals anything under a retired version."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    b = await vaults.open()
    ct_v1 = await b.encrypt(AUTH, "credentials", b"v1")  # B caches v1 only
    clock.advance(10)
    await a.rotate_key(OPS, "credentials")  # v2 created at T
    for waited, retry_ms in ((0, str(FRESHNESS_US // 1000)), (FRESHNESS_US - 1, "1")):
        clock.advance(waited)
        with pytest.raises(FailedPrecondition) as refused:
            await a.update_key_config(OPS, "credentials", min_decryption_version=2)
        error = refused.value
        assert (error.code, error.reason) == (Code.FAILED_PRECONDITION, "VERSION_TOO_NEW")
        assert error.metadata == {"key_name": "credentials", "version": "2", "retry_after_ms": retry_ms}
        assert "retry in" in error.message
        assert error.retry_after_seconds == (FRESHNESS_US - waited) / 1e6  # RetryInfo
        assert (await a.get_key(OPS, "credentials")).config.min_decryption_version == 1
        # Meanwhile B, inside its window since its last confirmation, still seals under v1: legitimately,
        # v1 is not retired, and cannot be while B might do so.
    clock.advance(1)  # v2 is a whole window old: every replica encrypts under v2 from now on
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    raised_at = clock()
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)
    await decrypt_fails(a, "credentials", ct_v1)
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert await b.decrypt(AUTH, "credentials", ct_v1) == b"v1"  # B's cache predates the raise: the bound
    clock.advance(raised_at + FRESHNESS_US - clock())
    await decrypt_fails(b, "credentials", ct_v1)  # at most one window after the raise
    # Lowering it again retires nothing: no wait. Raising to an old version: no wait either.
    await a.update_key_config(OPS, "credentials", min_decryption_version=1)
    await a.rotate_key(OPS, "credentials")  # v3, brand new
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)
    with pytest.raises(FailedPrecondition):
        await a.update_key_config(OPS, "credentials", min_decryption_version=3)
