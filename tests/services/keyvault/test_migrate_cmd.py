"""`python -m services.keyvault migrate-root`, run as an operator would, against the vault's own settings."""

from __future__ import annotations

import asyncio
import io
import socket
import sys
from pathlib import Path

import pytest

from services.keyvault import migrate_cmd
from services.keyvault.core import KeyVault
from services.keyvault.model import KeyType
from services.keyvault.root import LocalSealedRoot, Pkcs11Root, RootKey
from services.keyvault.store_sqlite import SqliteVaultStore
from tests.support import free_port
from tradeguard.testing import FakeClock

from .conftest import SCRYPT_N

OLD = "the old passphrase"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRADEGUARD_HOME", str(tmp_path))
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PORT", str(free_port()))
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_SCRYPT_N", str(SCRYPT_N))
    for name in (
        "TRADEGUARD_KEYVAULT_PASSPHRASE",
        "TRADEGUARD_KEYVAULT_PASSPHRASE_FILE",
        "TRADEGUARD_KEYVAULT_ROOT",
    ):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "data").mkdir()
    return tmp_path


async def _vault(home: Path, root: RootKey) -> KeyVault:
    vault = KeyVault(await SqliteVaultStore.open(home / "data" / "keyvault.db"), clock=FakeClock(), root=root)
    await vault.start()
    return vault


async def _fill(home: Path) -> str:
    root = LocalSealedRoot.create(home / "data" / "keyvault.root", OLD, scrypt_n=SCRYPT_N)
    vault = await _vault(home, root)
    await vault.create_key("ops", "credentials", KeyType.AES256_GCM)
    ciphertext = await vault.encrypt("auth", "credentials", b"api secret", b"user-1")
    await vault.close()
    return ciphertext


async def _run(monkeypatch: pytest.MonkeyPatch, stdin: str, *argv: str) -> int:
    """The command in a thread of its own, as from a shell (it runs its own event loop)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return await asyncio.to_thread(migrate_cmd.main, list(argv))


async def test_moves_to_a_new_local_root(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ciphertext = await _fill(home)
    new_path = home / "data" / "keyvault-2.root"
    assert (
        await _run(monkeypatch, f"{OLD}\na new passphrase\n", "--to", "local", "--new-root", str(new_path))
        == 0
    )
    out = capsys.readouterr().out
    assert "re-wrapped 1 key versions and 0 secret data keys" in out
    assert f"TRADEGUARD_KEYVAULT_ROOT_PATH={new_path}" in out
    vault = await _vault(home, LocalSealedRoot.unseal(new_path, "a new passphrase"))
    assert await vault.decrypt("auth", "credentials", ciphertext, b"user-1") == b"api secret"
    await vault.close()


async def test_refusals_change_nothing(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    new_path = home / "data" / "keyvault-2.root"
    # no ring yet: refused, and no root created as a side effect
    assert (
        await _run(monkeypatch, f"{OLD}\na new passphrase\n", "--to", "local", "--new-root", str(new_path))
        == 2
    )
    assert "nothing to migrate" in capsys.readouterr().err
    assert list((home / "data").iterdir()) == []
    ciphertext = await _fill(home)
    # a wrong current passphrase: nothing created
    assert (
        await _run(monkeypatch, "not it\na new passphrase\n", "--to", "local", "--new-root", str(new_path))
        == 1
    )
    assert "does not open the root key" in capsys.readouterr().err and not new_path.exists()
    # a short new passphrase
    assert await _run(monkeypatch, f"{OLD}\nshort\n", "--to", "local", "--new-root", str(new_path)) == 1
    assert "at least 12 characters" in capsys.readouterr().err and not new_path.exists()
    # the vault still answers on its port: every replica must be stopped first
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("TRADEGUARD_KEYVAULT_PORT", str(listener.getsockname()[1]))
        assert (
            await _run(
                monkeypatch, f"{OLD}\na new passphrase\n", "--to", "local", "--new-root", str(new_path)
            )
            == 2
        )
    err = capsys.readouterr().err
    assert "stop every replica first" in err and OLD not in err
    vault = await _vault(home, LocalSealedRoot.unseal(home / "data" / "keyvault.root", OLD))
    assert await vault.decrypt("auth", "credentials", ciphertext, b"user-1") == b"api secret"
    await vault.close()


async def test_moves_into_an_hsm(
    home: Path, softhsm: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ciphertext = await _fill(home)
    argv = [
        "--to",
        "pkcs11",
        "--token",
        softhsm["token"],
        "--module",
        softhsm["module"],
        "--key-label",
        "tg-root",
    ]
    assert await _run(monkeypatch, f"{OLD}\n{softhsm['pin']}\n", *argv) == 0
    assert "TRADEGUARD_KEYVAULT_ROOT=pkcs11" in capsys.readouterr().out
    vault = await _vault(
        home, Pkcs11Root.open(softhsm["module"], softhsm["token"], softhsm["pin"], "tg-root")
    )
    assert await vault.decrypt("auth", "credentials", ciphertext, b"user-1") == b"api secret"
    await vault.close()
