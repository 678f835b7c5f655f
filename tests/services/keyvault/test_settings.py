"""Key vault settings: the kit's reader under the one prefix TRADEGUARD_KEYVAULT_, secrets from owner-only files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.keyvault.settings import Settings


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRADEGUARD_HOME", str(tmp_path))
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE", "pass")
    s = Settings.from_env()
    assert s.server.port == 50054 and s.root_mode == "local"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'keyvault.db'}"
    assert s.root_path == tmp_path / "data" / "keyvault.root"
    assert "pass" not in repr(s) and s.max_encryptions_per_version == 2**31
    assert s.key_freshness_s == 0.5
    for bad in ("-1", "61", "nan", "inf"):
        monkeypatch.setenv("TRADEGUARD_KEYVAULT_KEY_FRESHNESS_S", bad)
        monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE", "pass")
        with pytest.raises(ValueError, match="KEY_FRESHNESS_S"):
            Settings.from_env()
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_KEY_FRESHNESS_S", "0")
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE", "pass")
    s = Settings.from_env()
    assert s.key_freshness_s == 0.0
    assert "TRADEGUARD_KEYVAULT_PASSPHRASE" not in os.environ  # children never inherit it
    assert s.startup.take() == "pass"
    assert s.startup.take() is None  # one shot: no reference left once the vault is unsealed
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_ROOT", "pkcs11")
    with pytest.raises(ValueError, match="TOKEN"):
        Settings.from_env()
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PKCS11_TOKEN", "tg")
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PKCS11_PIN", "1234")
    s = Settings.from_env()
    assert s.root_mode == "pkcs11" and s.startup.take() == "1234" and s.pkcs11_token == "tg"
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_DATABASE_URL", "mysql://x")
    with pytest.raises(ValueError, match="DATABASE_URL"):
        Settings.from_env()


def test_passphrase_file_must_be_owner_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TRADEGUARD_KEYVAULT_PASSPHRASE_FILE: read once, refused unless 0600/0400; never in Settings' fields."""
    monkeypatch.setenv("TRADEGUARD_HOME", str(tmp_path))
    monkeypatch.delenv("TRADEGUARD_KEYVAULT_PASSPHRASE", raising=False)
    secret = tmp_path / "passphrase"
    secret.write_text("from a file\n")
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE_FILE", str(secret))
    for mode in (0o644, 0o640, 0o604, 0o660):
        secret.chmod(mode)
        with pytest.raises(ValueError, match=r"PASSPHRASE_FILE.*chmod 600"):
            Settings.from_env()
    secret.chmod(0o600)
    s = Settings.from_env()
    assert "from a file" not in repr(s)
    assert s.startup.take() == "from a file"
    secret.chmod(0o400)
    assert Settings.from_env().startup.take() == "from a file"
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE", "also in env")
    with pytest.raises(ValueError, match="not both"):
        Settings.from_env()
    assert "TRADEGUARD_KEYVAULT_PASSPHRASE" not in os.environ  # popped even when refused
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot open"):
        Settings.from_env()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE_FILE", str(empty))
    with pytest.raises(ValueError, match="empty"):
        Settings.from_env()
    link = tmp_path / "link"
    link.symlink_to(secret)
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE_FILE", str(link))
    with pytest.raises(ValueError, match="cannot open"):
        Settings.from_env()


def test_settings_under_the_old_prefix_are_refused_by_name_and_a_plain_secret_still_leaves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRADEGUARD_HOME", str(tmp_path))
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE", "old secret")
    monkeypatch.setenv("TRADEGUARD_VAULT_ROOT", "local")
    with pytest.raises(ValueError) as refused:
        Settings.from_env()
    message = str(refused.value)
    assert "TRADEGUARD_VAULT_ROOT → TRADEGUARD_KEYVAULT_ROOT" in message
    assert "TRADEGUARD_VAULT_PASSPHRASE → TRADEGUARD_KEYVAULT_PASSPHRASE" in message
    assert "old secret" not in message
    assert "TRADEGUARD_VAULT_PASSPHRASE" not in os.environ
