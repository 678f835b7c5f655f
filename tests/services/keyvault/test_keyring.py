"""The pure key ring and the settings: properties of the ciphertext format, and start-up configuration."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.keyvault.errors import DecryptionFailed
from services.keyvault.keyring import LoadedKey, parse_token
from services.keyvault.model import KeyConfig, KeyType, StoredKey, VersionRecord
from services.keyvault.settings import Settings

KEY = LoadedKey(
    StoredKey(
        KeyConfig("credentials", KeyType.AES256_GCM, 1, 0, False, 0, 0),
        (VersionRecord(1, b"", b"", 0),),
    ),
    {1: bytes(range(32))},
)


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(max_size=256),
    ad=st.binary(max_size=64),
    nonce=st.binary(min_size=12, max_size=12),
    data=st.data(),
)
def test_round_trip_and_any_single_change_fails(
    plaintext: bytes, ad: bytes, nonce: bytes, data: st.DataObject
) -> None:
    ct = KEY.encrypt(plaintext, ad, nonce)
    token = parse_token(ct)
    assert token is not None and token.prefix == "tgv1:credentials:v1:"
    assert KEY.decrypt(ct, ad) == (plaintext, 1)
    i = data.draw(st.integers(0, len(ct) - 1))
    replacement = data.draw(st.sampled_from("Av1:_-x").filter(lambda c: c != ct[i]))
    with pytest.raises(DecryptionFailed):
        KEY.decrypt(ct[:i] + replacement + ct[i + 1 :], ad)
    other_ad = data.draw(st.binary(max_size=64).filter(lambda b: b != ad))
    with pytest.raises(DecryptionFailed):
        KEY.decrypt(ct, other_ad)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TRADEGUARD_HOME", str(tmp_path))
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE", "pass")
    s = Settings.from_env()
    assert s.server.port == 50054 and s.root_mode == "local"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'keyvault.db'}"
    assert s.root_path == tmp_path / "data" / "keyvault.root"
    assert "pass" not in repr(s) and s.max_encryptions_per_version == 2**31
    assert s.key_freshness_s == 0.5
    for bad in ("-1", "61", "nan", "inf"):
        monkeypatch.setenv("TRADEGUARD_VAULT_KEY_FRESHNESS_S", bad)
        monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE", "pass")
        with pytest.raises(ValueError, match="KEY_FRESHNESS_S"):
            Settings.from_env()
    monkeypatch.setenv("TRADEGUARD_VAULT_KEY_FRESHNESS_S", "0")
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE", "pass")
    s = Settings.from_env()
    assert s.key_freshness_s == 0.0
    assert "TRADEGUARD_VAULT_PASSPHRASE" not in os.environ  # children never inherit it
    assert s.startup.take() == "pass"
    assert s.startup.take() is None  # one shot: no reference left once the vault is unsealed
    monkeypatch.setenv("TRADEGUARD_VAULT_ROOT", "pkcs11")
    with pytest.raises(ValueError, match="TOKEN"):
        Settings.from_env()
    monkeypatch.setenv("TRADEGUARD_VAULT_PKCS11_TOKEN", "tg")
    monkeypatch.setenv("TRADEGUARD_VAULT_PKCS11_PIN", "1234")
    s = Settings.from_env()
    assert s.root_mode == "pkcs11" and s.startup.take() == "1234" and s.pkcs11_token == "tg"
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_DATABASE_URL", "mysql://x")
    with pytest.raises(ValueError, match="DATABASE_URL"):
        Settings.from_env()


def test_passphrase_file_must_be_owner_only(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """TRADEGUARD_VAULT_PASSPHRASE_FILE: read once, refused unless 0600/0400; never in Settings' fields."""
    monkeypatch.setenv("TRADEGUARD_HOME", str(tmp_path))
    monkeypatch.delenv("TRADEGUARD_VAULT_PASSPHRASE", raising=False)
    secret = tmp_path / "passphrase"
    secret.write_text("from a file\n")
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE_FILE", str(secret))
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
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE", "also in env")
    with pytest.raises(ValueError, match="not both"):
        Settings.from_env()
    assert "TRADEGUARD_VAULT_PASSPHRASE" not in os.environ  # popped even when refused
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot open"):
        Settings.from_env()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE_FILE", str(empty))
    with pytest.raises(ValueError, match="empty"):
        Settings.from_env()
    link = tmp_path / "link"
    link.symlink_to(secret)
    monkeypatch.setenv("TRADEGUARD_VAULT_PASSPHRASE_FILE", str(link))
    with pytest.raises(ValueError, match="cannot open"):
        Settings.from_env()
