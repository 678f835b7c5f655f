"""Key vault settings, read once at start-up from the environment.

- TRADEGUARD_KEYVAULT_DATABASE_URL: `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/keyvault.db`) or
  `postgresql://…`.
- TRADEGUARD_KEYVAULT_ROOT: `local` (default) or `pkcs11`.
- local: TRADEGUARD_KEYVAULT_ROOT_PATH (default `$TRADEGUARD_HOME/data/keyvault.root`), the passphrase (without it
  the vault starts sealed; the first passphrase creates the root key), TRADEGUARD_KEYVAULT_SCRYPT_N.
  The passphrase: preferably TRADEGUARD_KEYVAULT_PASSPHRASE_FILE, a file readable by its owner only (0600 or 0400,
  owned by the vault's user; anything else is refused), read once; or TRADEGUARD_KEYVAULT_PASSPHRASE (weaker: the
  value stays readable in /proc/<pid>/environ for the life of the process, whatever the process does).
- pkcs11: TRADEGUARD_KEYVAULT_PKCS11_MODULE (default SoftHSM2), TRADEGUARD_KEYVAULT_PKCS11_TOKEN (token label),
  the PIN as TRADEGUARD_KEYVAULT_PKCS11_PIN_FILE (preferred, same rules) or TRADEGUARD_KEYVAULT_PKCS11_PIN (without it
  the vault starts sealed; Unseal takes the PIN), TRADEGUARD_KEYVAULT_PKCS11_KEY_LABEL.
- TRADEGUARD_KEYVAULT_POLICY: a JSON policy file replacing the default per-key policy.
- TRADEGUARD_KEYVAULT_ROTATION_CHECK_S: how often automatic rotation is checked (default 60).
- TRADEGUARD_KEYVAULT_MAX_ENCRYPTIONS_PER_VERSION: encryptions under one key version before the vault rotates the
  key by itself (default 2^31; random 96-bit AES-GCM nonces allow about 2^32).
- TRADEGUARD_KEYVAULT_KEY_FRESHNESS_S: how long (seconds, default 0.5, at most 60) a replica uses a cached key
  without asking the shared store whether another replica changed it; 0 asks before every use (one store read
  per operation). Security: min_decryption_version can only be raised to a version at least this old (so no
  replica ever encrypts under a retired version), but a replica may go on decrypting a version retired, or
  using a key deleted, on another replica for up to this long: keep it within the mesh's revocation budget
  (well under a second, DESIGN.md), with replicas' clocks in sync to well within it.- TRADEGUARD_KEYVAULT_AUDIT (default true), _AUDIT_TARGET (default 127.0.0.1:<the registry's audit port>),
  _AUDIT_SERVER_NAME: key administration, decryptions and secret reads recorded in the audit service before
  their answer is released (tradeguard.audit.recording: fail closed); the audit service's own calls are not.

Plus the shared server settings (ServerConfig.from_env). The passphrase and PIN are removed from the process
environment once read, so that child processes never inherit them, and they are not part of `Settings`: they
sit in a one-shot `StartupSecret` that the server empties when it unseals.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from tradeguard.audit.recording import RecordingSettings
from tradeguard.mesh.server import ServerConfig
from tradeguard.registry import env_prefix
from tradeguard.service import CommonSettings, read_settings
from tradeguard.settings import Env, SettingsError

NAME = "keyvault"
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_KEY_LABEL = "tradeguard-keyvault-root"
DEFAULT_MAX_ENCRYPTIONS = 2**31
DEFAULT_KEY_FRESHNESS_S = 0.5
MAX_KEY_FRESHNESS_S = 60.0
PREFIX = env_prefix(NAME)  # TRADEGUARD_KEYVAULT: one prefix for all of the vault's settings
_RENAMED_FROM = "TRADEGUARD_VAULT_"  # the vault's own settings' prefix before 0.2


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
    recording: RecordingSettings = field(default_factory=RecordingSettings)  # key admin, decryptions: audited

    @classmethod
    def read(cls, env: Env, common: CommonSettings) -> Settings:
        """The vault's own settings (see the module docstring) on top of the common ones."""
        _refuse_old_names(env)
        mode = env.choice("ROOT", "local", ("local", "pkcs11"))
        try:
            secret = env.secret("PKCS11_PIN" if mode == "pkcs11" else "PASSPHRASE")
        finally:  # neither start-up secret may outlive the read in the environment, whichever mode
            env.environ.pop(env.name("PASSPHRASE" if mode == "pkcs11" else "PKCS11_PIN"), None)
        token = env.text("PKCS11_TOKEN", "")
        if mode == "pkcs11" and not token:
            raise SettingsError(f"{env.name('PKCS11_TOKEN')} (the token label) is required with pkcs11")
        return cls(
            server=common.server,
            database_url=common.database_url,
            root_mode=mode,
            root_path=local_root_path(env.environ, common.server.home),
            startup=StartupSecret(secret),
            scrypt_n=scrypt_n(env.environ),
            pkcs11_module=env.text("PKCS11_MODULE", DEFAULT_PKCS11_MODULE),
            pkcs11_token=token,
            pkcs11_key_label=env.text("PKCS11_KEY_LABEL", DEFAULT_KEY_LABEL),
            policy_path=env.optional_path("POLICY"),
            rotation_check_s=env.number("ROTATION_CHECK_S", 60.0, low=0.01, high=86400.0),
            max_encryptions_per_version=env.integer(
                "MAX_ENCRYPTIONS_PER_VERSION", DEFAULT_MAX_ENCRYPTIONS, low=1, high=2**32
            ),
            key_freshness_s=env.number(
                "KEY_FRESHNESS_S", DEFAULT_KEY_FRESHNESS_S, low=0.0, high=MAX_KEY_FRESHNESS_S
            ),
            recording=RecordingSettings.read(env),
        )

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> Settings:
        """All of the vault's settings from the environment (the operator commands use it too)."""
        from services.keyvault.service import SERVICE  # the declaration imports these settings

        return read_settings(SERVICE, environ)


def local_root_path(env: Mapping[str, str], home: Path) -> Path:
    """Where the local sealed root key lives (TRADEGUARD_KEYVAULT_ROOT_PATH, else under the data directory)."""
    return Path(env.get(f"{PREFIX}_ROOT_PATH") or home / "data" / "keyvault.root")


def scrypt_n(env: Mapping[str, str]) -> int:
    """scrypt's cost for sealing the local root key (TRADEGUARD_KEYVAULT_SCRYPT_N, a power of two, default 2^15)."""
    value = Env(PREFIX, dict(env)).integer("SCRYPT_N", 2**15, low=2**10, high=2**22)
    if value & (value - 1):
        raise SettingsError(f"{PREFIX}_SCRYPT_N must be a power of two, got {value}")
    return value


def _refuse_old_names(env: Env) -> None:
    """A setting under the old TRADEGUARD_VAULT_ prefix is refused by name rather than silently ignored (a vault
    whose passphrase file went unread would start sealed). A plain secret under an old name still leaves the
    environment first."""
    old = sorted(name for name in env.environ if name.startswith(_RENAMED_FROM))
    for secret in ("PASSPHRASE", "PKCS11_PIN"):
        env.environ.pop(_RENAMED_FROM + secret, None)
    if old:
        renamed = ", ".join(f"{name} → {PREFIX}_{name.removeprefix(_RENAMED_FROM)}" for name in old)
        raise SettingsError(f"the key vault's settings were renamed: {renamed}")
