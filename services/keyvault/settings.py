"""Key vault settings, read once at start-up from the environment.

- TRADEGUARD_KEYVAULT_DATABASE_URL: `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/keyvault.db`) or
  `postgresql://…`.
- TRADEGUARD_VAULT_ROOT: `local` (default) or `pkcs11`.
- local: TRADEGUARD_VAULT_ROOT_PATH (default `$TRADEGUARD_HOME/data/keyvault.root`), the passphrase (without it
  the vault starts sealed; the first passphrase creates the root key), TRADEGUARD_VAULT_SCRYPT_N.
  The passphrase: preferably TRADEGUARD_VAULT_PASSPHRASE_FILE, a file readable by its owner only (0600 or 0400,
  owned by the vault's user; anything else is refused), read once; or TRADEGUARD_VAULT_PASSPHRASE (weaker: the
  value stays readable in /proc/<pid>/environ for the life of the process, whatever the process does).
- pkcs11: TRADEGUARD_VAULT_PKCS11_MODULE (default SoftHSM2), TRADEGUARD_VAULT_PKCS11_TOKEN (token label),
  the PIN as TRADEGUARD_VAULT_PKCS11_PIN_FILE (preferred, same rules) or TRADEGUARD_VAULT_PKCS11_PIN (without it
  the vault starts sealed; Unseal takes the PIN), TRADEGUARD_VAULT_PKCS11_KEY_LABEL.
- TRADEGUARD_VAULT_POLICY: a JSON policy file replacing the default per-key policy.
- TRADEGUARD_VAULT_ROTATION_CHECK_S: how often automatic rotation is checked (default 60).
- TRADEGUARD_VAULT_MAX_ENCRYPTIONS_PER_VERSION: encryptions under one key version before the vault rotates the
  key by itself (default 2^31; random 96-bit AES-GCM nonces allow about 2^32).
- TRADEGUARD_VAULT_KEY_FRESHNESS_S: how long (seconds, default 0.5, at most 60) a replica uses a cached key
  without asking the shared store whether another replica changed it; 0 asks before every use (one store read
  per operation). Security: min_decryption_version can only be raised to a version at least this old (so no
  replica ever encrypts under a retired version), but a replica may go on decrypting a version retired, or
  using a key deleted, on another replica for up to this long: keep it within the mesh's revocation budget
  (well under a second, DESIGN.md), with replicas' clocks in sync to well within it.
Plus the shared server settings (ServerConfig.from_env). The passphrase and PIN are removed from the process
environment once read, so that child processes never inherit them, and they are not part of `Settings`: they
sit in a one-shot `StartupSecret` that the server empties when it unseals.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tradeguard.mesh.server import ServerConfig
from tradeguard.storage import database_url

NAME = "keyvault"
DEFAULT_PORT = 50054
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_KEY_LABEL = "tradeguard-keyvault-root"
DEFAULT_MAX_ENCRYPTIONS = 2**31
DEFAULT_KEY_FRESHNESS_S = 0.5
MAX_KEY_FRESHNESS_S = 60.0


class StartupSecret:
    """The passphrase or PIN that unseals the vault at start-up: `take()` hands it out once and forgets it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None = None) -> None:
        self._value = value

    def take(self) -> str | None:
        value, self._value = self._value, None
        return value

    def __repr__(self) -> str:
        return "StartupSecret(<set>)" if self._value is not None else "StartupSecret(<empty>)"


def read_secret_file(path: Path, variable: str) -> str:
    """The secret in `path` (without its trailing newline); only from a regular file of ours, owner-only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise ValueError(f"{variable}: cannot open {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{variable}: {path} is not a regular file")
        if info.st_uid != os.getuid():
            raise ValueError(f"{variable}: {path} must be owned by the vault's user (uid {os.getuid()})")
        if mode & 0o077:
            raise ValueError(
                f"{variable}: {path} is readable by others (mode {mode:04o}); refusing it: chmod 600 {path}"
            )
        text = file.read().decode("utf-8").rstrip("\r\n")
    if not text:
        raise ValueError(f"{variable}: {path} is empty")
    return text


def _secret(env: os._Environ[str], variable: str) -> str | None:
    """`<variable>_FILE` (preferred) or `<variable>`; both at once is a configuration error."""
    path = env.get(variable + "_FILE")
    value = env.get(variable) or None
    if path:
        if value is not None:
            raise ValueError(f"set {variable}_FILE or {variable}, not both")
        return read_secret_file(Path(path), variable + "_FILE")
    return value


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    root_mode: str = "local"
    root_path: Path = Path("keyvault.root")
    startup: StartupSecret = field(default_factory=StartupSecret, repr=False, compare=False)
    scrypt_n: int = 2**15
    pkcs11_module: str = DEFAULT_PKCS11_MODULE
    pkcs11_token: str = ""
    pkcs11_key_label: str = DEFAULT_KEY_LABEL
    policy_path: Path | None = None
    rotation_check_s: float = 60.0
    max_encryptions_per_version: int = DEFAULT_MAX_ENCRYPTIONS
    key_freshness_s: float = DEFAULT_KEY_FRESHNESS_S

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
        max_encryptions = int(
            env.get("TRADEGUARD_VAULT_MAX_ENCRYPTIONS_PER_VERSION", str(DEFAULT_MAX_ENCRYPTIONS))
        )
        if not 1 <= max_encryptions <= 2**32:
            raise ValueError("TRADEGUARD_VAULT_MAX_ENCRYPTIONS_PER_VERSION must be between 1 and 2^32")
        freshness = float(env.get("TRADEGUARD_VAULT_KEY_FRESHNESS_S", str(DEFAULT_KEY_FRESHNESS_S)))
        if not 0.0 <= freshness <= MAX_KEY_FRESHNESS_S:  # also refuses nan
            raise ValueError(
                f"TRADEGUARD_VAULT_KEY_FRESHNESS_S must be between 0 and {MAX_KEY_FRESHNESS_S:g}"
            )
        policy = env.get("TRADEGUARD_VAULT_POLICY")
        try:
            secret = _secret(
                env, "TRADEGUARD_VAULT_PKCS11_PIN" if mode == "pkcs11" else "TRADEGUARD_VAULT_PASSPHRASE"
            )
        finally:
            for variable in ("TRADEGUARD_VAULT_PASSPHRASE", "TRADEGUARD_VAULT_PKCS11_PIN"):
                env.pop(variable, None)
        return cls(
            server=server,
            database_url=url,
            root_mode=mode,
            root_path=local_root_path(env, server.home),
            startup=StartupSecret(secret),
            scrypt_n=scrypt_n(env),
            pkcs11_module=env.get("TRADEGUARD_VAULT_PKCS11_MODULE", DEFAULT_PKCS11_MODULE),
            pkcs11_token=token,
            pkcs11_key_label=env.get("TRADEGUARD_VAULT_PKCS11_KEY_LABEL", DEFAULT_KEY_LABEL),
            policy_path=Path(policy) if policy else None,
            rotation_check_s=float(env.get("TRADEGUARD_VAULT_ROTATION_CHECK_S", "60")),
            max_encryptions_per_version=max_encryptions,
            key_freshness_s=freshness,
        )


def local_root_path(env: Mapping[str, str], home: Path) -> Path:
    """Where the local sealed root key lives (TRADEGUARD_VAULT_ROOT_PATH, else under the data directory)."""
    return Path(env.get("TRADEGUARD_VAULT_ROOT_PATH") or home / "data" / "keyvault.root")


def scrypt_n(env: Mapping[str, str]) -> int:
    """scrypt's cost for sealing the local root key (TRADEGUARD_VAULT_SCRYPT_N, default 2^15)."""
    return int(env.get("TRADEGUARD_VAULT_SCRYPT_N", str(2**15)))
