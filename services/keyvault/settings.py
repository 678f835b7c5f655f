"""Key vault settings, read once at start-up from the environment.

- TRADEGUARD_KEYVAULT_DATABASE_URL: `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/keyvault.db`) or
  `postgresql://…`.
- TRADEGUARD_VAULT_ROOT: `local` (default) or `pkcs11`.
- local: TRADEGUARD_VAULT_ROOT_PATH (default `$TRADEGUARD_HOME/data/keyvault.root`), TRADEGUARD_VAULT_PASSPHRASE
  (without it the vault starts sealed; the first passphrase creates the root key), TRADEGUARD_VAULT_SCRYPT_N.
- pkcs11: TRADEGUARD_VAULT_PKCS11_MODULE (default SoftHSM2), TRADEGUARD_VAULT_PKCS11_TOKEN (token label),
  TRADEGUARD_VAULT_PKCS11_PIN (without it the vault starts sealed; Unseal takes the PIN),
  TRADEGUARD_VAULT_PKCS11_KEY_LABEL.
- TRADEGUARD_VAULT_POLICY: a JSON policy file replacing the default per-key policy.
- TRADEGUARD_VAULT_ROTATION_CHECK_S: how often automatic rotation is checked (default 60).
Plus the shared server settings (ServerConfig.from_env). The passphrase and PIN are removed from the process
environment once read, so that child processes never inherit them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tradeguard.mesh.server import ServerConfig
from tradeguard.storage import database_url

NAME = "keyvault"
DEFAULT_PORT = 50054
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_KEY_LABEL = "tradeguard-keyvault-root"


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    root_mode: str = "local"
    root_path: Path = Path("keyvault.root")
    passphrase: str | None = field(default=None, repr=False)
    scrypt_n: int = 2**15
    pkcs11_module: str = DEFAULT_PKCS11_MODULE
    pkcs11_token: str = ""
    pkcs11_pin: str | None = field(default=None, repr=False)
    pkcs11_key_label: str = DEFAULT_KEY_LABEL
    policy_path: Path | None = None
    rotation_check_s: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        server = ServerConfig.from_env(NAME, DEFAULT_PORT)
        env = os.environ
        url = database_url("TRADEGUARD_KEYVAULT_DATABASE_URL", server.home / "data" / "keyvault.db")
        mode = env.get("TRADEGUARD_VAULT_ROOT", "local")
        if mode not in ("local", "pkcs11"):
            raise ValueError("TRADEGUARD_VAULT_ROOT must be local or pkcs11")
        token = env.get("TRADEGUARD_VAULT_PKCS11_TOKEN", "")
        if mode == "pkcs11" and not token:
            raise ValueError("TRADEGUARD_VAULT_PKCS11_TOKEN (the token label) is required with pkcs11")
        policy = env.get("TRADEGUARD_VAULT_POLICY")
        settings = cls(
            server=server,
            database_url=url,
            root_mode=mode,
            root_path=Path(env.get("TRADEGUARD_VAULT_ROOT_PATH") or server.home / "data" / "keyvault.root"),
            passphrase=env.get("TRADEGUARD_VAULT_PASSPHRASE") or None,
            scrypt_n=int(env.get("TRADEGUARD_VAULT_SCRYPT_N", str(2**15))),
            pkcs11_module=env.get("TRADEGUARD_VAULT_PKCS11_MODULE", DEFAULT_PKCS11_MODULE),
            pkcs11_token=token,
            pkcs11_pin=env.get("TRADEGUARD_VAULT_PKCS11_PIN") or None,
            pkcs11_key_label=env.get("TRADEGUARD_VAULT_PKCS11_KEY_LABEL", DEFAULT_KEY_LABEL),
            policy_path=Path(policy) if policy else None,
            rotation_check_s=float(env.get("TRADEGUARD_VAULT_ROTATION_CHECK_S", "60")),
        )
        for secret in ("TRADEGUARD_VAULT_PASSPHRASE", "TRADEGUARD_VAULT_PKCS11_PIN"):
            env.pop(secret, None)
        return settings

    @property
    def startup_secret(self) -> str | None:
        """What unseals the vault at start-up, if configured (passphrase or PIN)."""
        return self.pkcs11_pin if self.root_mode == "pkcs11" else self.passphrase
