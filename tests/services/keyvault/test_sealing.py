"""Unseal checks the passphrase (or PIN) even when the vault is unsealed already (newcomer defect 6).

It used to answer OK (`vault unseal` printed `{}` and exited 0) without looking at the passphrase on an unsealed
vault: anyone allowed to call Unseal learned nothing, but an operator typing a wrong passphrase was told it was
fine. Now a wrong one gets the same refusal as on a sealed vault, and a right one a plain OK.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.keyvault.core import KeyVault
from services.keyvault.errors import Code, FieldViolation, InvalidArgument, PermissionDenied, Unavailable
from services.keyvault.model import KeyType, SealStatus
from services.keyvault.root import LocalSealedRoot, Pkcs11Root
from services.keyvault.store_sqlite import SqliteVaultStore
from tradeguard.testing import FakeClock

from .conftest import AES, AUTH, OPS, PASSPHRASE, SCRYPT_N, VaultFactory

WRONG = [FieldViolation("passphrase", "does not unseal the vault")]


async def _refusal(vault: KeyVault, passphrase: str) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as refused:
        await vault.unseal(OPS, passphrase)
    return refused.value.violations


async def test_a_wrong_passphrase_is_refused_on_an_unsealed_vault_as_on_a_sealed_one(
    vaults: VaultFactory,
) -> None:
    unsealed = await vaults.open()
    sealed = await vaults.open(unsealed=False)
    assert await _refusal(sealed, "wrong passphrase") == WRONG
    assert await _refusal(unsealed, "wrong passphrase") == WRONG
    # The refusal changed nothing: the unsealed vault still works, the sealed one is still sealed.
    await unsealed.create_key(OPS, "credentials", KeyType.AES256_GCM)
    assert (
        await unsealed.decrypt(AUTH, "credentials", await unsealed.encrypt(AUTH, "credentials", b"x")) == b"x"
    )
    assert sealed.sealed and not unsealed.sealed


async def test_the_right_passphrase_on_an_unsealed_vault_is_a_plain_ok(vaults: VaultFactory) -> None:
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", KeyType.AES256_GCM)
    ct = await vault.encrypt(AUTH, "credentials", b"x")
    assert await vault.unseal(OPS, PASSPHRASE) == SealStatus(sealed=False, root_kind="local")
    assert await vault.decrypt(AUTH, "credentials", ct) == b"x"  # the root in use was left as it was


async def test_policy_and_syntax_come_before_the_passphrase_check(vaults: VaultFactory) -> None:
    vault = await vaults.open()
    with pytest.raises(PermissionDenied):
        await vault.unseal(AUTH, "wrong passphrase")
    with pytest.raises(InvalidArgument) as empty:
        await vault.unseal(OPS, "")
    assert empty.value.violations == [FieldViolation("passphrase", "is required")]


async def test_a_vault_given_its_root_at_start_checks_the_passphrase_without_an_unsealer(
    tmp_path: Path,
) -> None:
    store = await SqliteVaultStore.open(tmp_path / "kv.db")
    root = LocalSealedRoot.create(tmp_path / "root", PASSPHRASE, scrypt_n=SCRYPT_N)
    vault = KeyVault(store, clock=FakeClock(), root=root)
    await vault.start()
    try:
        assert await _refusal(vault, "wrong passphrase") == WRONG
        assert await vault.unseal(OPS, PASSPHRASE) == SealStatus(sealed=False, root_kind="local")
    finally:
        await vault.close()
        await store.close()


async def test_the_passphrase_checked_is_the_one_the_sealed_file_holds_now(vaults: VaultFactory) -> None:
    vault = await vaults.open()
    LocalSealedRoot.change_passphrase(vaults.root_path, PASSPHRASE, "a new passphrase", scrypt_n=SCRYPT_N)
    assert await _refusal(vault, PASSPHRASE) == WRONG
    assert not (await vault.unseal(OPS, "a new passphrase")).sealed


async def test_another_root_under_the_passphrase_is_refused_and_the_vault_stays_unsealed(
    vaults: VaultFactory,
) -> None:
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", KeyType.AES256_GCM)
    ct = await vault.encrypt(AUTH, "credentials", b"x")
    # The root file now holds another root key (not the one in use) under the same passphrase.
    vaults.root_path.unlink()
    LocalSealedRoot.create(vaults.root_path, PASSPHRASE, scrypt_n=SCRYPT_N).close()
    assert await _refusal(vault, PASSPHRASE) == WRONG
    assert await vault.decrypt(AUTH, "credentials", ct) == b"x"


async def test_an_hsm_pin_is_checked_on_an_unsealed_vault(softhsm: dict[str, str], tmp_path: Path) -> None:
    def unsealer(pin: str) -> Pkcs11Root:
        return Pkcs11Root.open(softhsm["module"], softhsm["token"], pin, "tg-root")

    store = await SqliteVaultStore.open(tmp_path / "kv.db")
    vault = KeyVault(store, clock=FakeClock(), root=unsealer(softhsm["pin"]), unsealer=unsealer)
    await vault.start()
    try:
        await vault.create_key(OPS, "credentials", KeyType.AES256_GCM)
        ct = await vault.encrypt(AUTH, "credentials", b"hsm")
        assert await _refusal(vault, "wrong-pin") == WRONG
        assert await vault.unseal(OPS, softhsm["pin"]) == SealStatus(sealed=False, root_kind="pkcs11")
        # Checking the PIN opened and closed a session of its own: the vault's session still works.
        assert await vault.decrypt(AUTH, "credentials", ct) == b"hsm"
        assert await _refusal(vault, "wrong-pin") == WRONG
    finally:
        await vault.close()
        await store.close()


async def test_sealed_vault_is_unavailable_until_unsealed(vaults: VaultFactory) -> None:
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"secret")
    restarted = await vaults.open(unsealed=False)
    assert restarted.seal_status().sealed
    for call in (
        restarted.encrypt(AUTH, "credentials", b"x"),
        restarted.decrypt(AUTH, "credentials", ct),
        restarted.get_key(OPS, "credentials"),
        restarted.create_key(OPS, "k2", AES),
        restarted.put_secret(AUTH, "alice", "auth/totp", b"seed"),
    ):
        with pytest.raises(Unavailable) as info:
            await call
        assert info.value.code is Code.UNAVAILABLE and info.value.reason == "VAULT_SEALED"
    with pytest.raises(PermissionDenied):
        await restarted.unseal(AUTH, "correct horse battery staple")  # only ops unseals
    with pytest.raises(InvalidArgument) as wrong:
        await restarted.unseal(OPS, "wrong passphrase")
    assert "passphrase" in wrong.value.message
    assert restarted.seal_status().sealed
    status = await restarted.unseal(OPS, "correct horse battery staple")
    assert not status.sealed and status.root_kind == "local"
    assert await restarted.decrypt(AUTH, "credentials", ct) == b"secret"
    restarted.seal()
    with pytest.raises(Unavailable):
        await restarted.decrypt(AUTH, "credentials", ct)
