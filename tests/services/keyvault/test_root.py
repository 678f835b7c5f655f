"""Root keys: the local sealed root on disk, and a PKCS#11 root in a real SoftHSM2 token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.keyvault.core import KeyVault
from services.keyvault.errors import DecryptionFailed, FailedPrecondition, InvalidArgument
from services.keyvault.model import KeyType
from services.keyvault.root import LocalSealedRoot, Pkcs11Root, RootUnwrapError, WrongPassphrase
from services.keyvault.store_sqlite import SqliteVaultStore
from tradeguard.testing import FakeClock

AES = KeyType.AES256_GCM


def test_local_root_seal_unseal(tmp_path: Path) -> None:
    path = tmp_path / "root.json"
    root = LocalSealedRoot.create(path, "passphrase", scrypt_n=2**10)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    blob = root.wrap(b"material", b"ad")
    again = LocalSealedRoot.unseal(path, "passphrase")
    assert again.unwrap(blob, b"ad") == b"material"
    with pytest.raises(RootUnwrapError):
        again.unwrap(blob, b"other ad")
    with pytest.raises(RootUnwrapError):
        again.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), b"ad")
    with pytest.raises(WrongPassphrase):
        LocalSealedRoot.unseal(path, "Passphrase")
    with pytest.raises(FileExistsError):
        LocalSealedRoot.create(path, "other", scrypt_n=2**10)  # never overwrites a sealed root
    document = json.loads(path.read_text())
    assert document["kdf"]["name"] == "scrypt" and "material" not in path.read_text()
    other = LocalSealedRoot.create(tmp_path / "other.json", "passphrase", scrypt_n=2**10)
    with pytest.raises(RootUnwrapError):
        other.unwrap(blob, b"ad")  # same passphrase, another random root


def test_change_passphrase_reseals_the_same_root(tmp_path: Path) -> None:
    path = tmp_path / "root.json"
    root = LocalSealedRoot.create(path, "old passphrase", scrypt_n=2**10)
    blob = root.wrap(b"material", b"ad")
    before = path.read_bytes()
    with pytest.raises(WrongPassphrase):
        LocalSealedRoot.change_passphrase(path, "not it", "new passphrase", scrypt_n=2**10)
    assert path.read_bytes() == before  # a refused change leaves the sealing as it was
    with pytest.raises(WrongPassphrase):
        LocalSealedRoot.change_passphrase(path, "old passphrase", "", scrypt_n=2**10)
    LocalSealedRoot.change_passphrase(path, "old passphrase", "new passphrase", scrypt_n=2**10)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["root.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["kdf"]["salt"] != json.loads(before)["kdf"]["salt"]
    with pytest.raises(WrongPassphrase):
        LocalSealedRoot.unseal(path, "old passphrase")
    assert LocalSealedRoot.unseal(path, "new passphrase").unwrap(blob, b"ad") == b"material"


def test_pkcs11_root_key_never_leaves_the_token(softhsm: dict[str, str]) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11 import KeyType as P11KeyType
    from pkcs11.exceptions import AttributeSensitive

    root = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "tg-root")
    try:
        blob = root.wrap(b"key material", b"ad")
        assert blob[:1] == b"\x02" and b"key material" not in blob
        assert root.unwrap(blob, b"ad") == b"key material"
        with pytest.raises(RootUnwrapError):
            root.unwrap(blob, b"other")
        with pytest.raises(RootUnwrapError):
            root.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), b"ad")
    finally:
        root.close()
    # The key was generated in the token: sensitive, never extractable; its value cannot be read.
    token = pkcs11.lib(softhsm["module"]).get_token(token_label=softhsm["token"])
    with token.open(user_pin=softhsm["pin"]) as session:
        key = session.get_key(label="tg-root", key_type=P11KeyType.AES, object_class=ObjectClass.SECRET_KEY)
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE] and key[Attribute.TOKEN]
        assert key[Attribute.VALUE_LEN] == 32
        with pytest.raises(AttributeSensitive):
            key[Attribute.VALUE]
    # Opening again finds the same key (no second key is generated).
    again = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "tg-root")
    try:
        assert again.unwrap(blob, b"ad") == b"key material"
    finally:
        again.close()
    with pytest.raises(WrongPassphrase):
        Pkcs11Root.open(softhsm["module"], softhsm["token"], "wrong-pin", "tg-root")


async def test_vault_on_an_hsm_root_survives_restart(softhsm: dict[str, str], tmp_path: Path) -> None:
    clock = FakeClock()

    def unsealer(pin: str) -> Pkcs11Root:
        return Pkcs11Root.open(softhsm["module"], softhsm["token"], pin, "tg-root")

    store = await SqliteVaultStore.open(tmp_path / "kv.db")
    vault = KeyVault(store, clock=clock, root=unsealer(softhsm["pin"]))
    await vault.start()
    assert vault.seal_status().root_kind == "pkcs11"
    await vault.create_key("ops", "credentials", AES)
    await vault.create_key("ops", "auth/jwt", KeyType.ED25519)
    ct = await vault.encrypt("auth", "credentials", b"hsm-protected", b"ad")
    await vault.rotate_key("ops", "credentials")
    sig = await vault.sign("auth", "auth/jwt", b"m")
    await vault.put_secret("auth", "alice", "auth/totp", b"seed")
    await vault.close()
    await store.close()

    # A restart without the PIN is sealed; Unseal with the PIN opens the token.
    store = await SqliteVaultStore.open(tmp_path / "kv.db")
    vault = KeyVault(store, clock=clock, unsealer=unsealer, root_kind="pkcs11")
    with pytest.raises(InvalidArgument):
        await vault.unseal("ops", "wrong-pin")
    await vault.unseal("ops", softhsm["pin"])
    try:
        assert await vault.decrypt("auth", "credentials", ct, b"ad") == b"hsm-protected"
        with pytest.raises(DecryptionFailed):
            await vault.decrypt("auth", "credentials", ct, b"other")
        assert await vault.verify("auth", "auth/jwt", b"m", sig)
        assert (await vault.get_secret("auth", "alice", "auth/totp"))[0] == b"seed"
    finally:
        await vault.close()
        await store.close()


async def test_another_root_key_is_refused(softhsm: dict[str, str], tmp_path: Path) -> None:
    store = await SqliteVaultStore.open(tmp_path / "kv.db")
    try:
        first = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "tg-root")
        vault = KeyVault(store, clock=FakeClock(), root=first)
        await vault.start()
        await vault.close()
        other = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "tg-other-root")
        vault = KeyVault(store, clock=FakeClock(), root=other)
        with pytest.raises(FailedPrecondition) as info:
            await vault.start()
        assert info.value.reason == "ROOT_KEY_MISMATCH"
        # A local root is refused too.
        local = LocalSealedRoot(os.urandom(32), os.urandom)
        vault = KeyVault(store, clock=FakeClock(), root=local)
        with pytest.raises(FailedPrecondition):
            await vault.start()
    finally:
        await store.close()


def test_pkcs11_open_without_create_never_makes_a_key(softhsm: dict[str, str]) -> None:
    """What migrate-root uses to open the vault's current HSM root: a missing key is an error, not a new key."""
    with pytest.raises(ValueError, match="holds no key 'absent'"):
        Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "absent", create=False)
    root = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "absent")  # now created
    root.close()
    again = Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "absent", create=False)
    again.close()
