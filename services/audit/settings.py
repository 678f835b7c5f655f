"""Audit service settings, read once at start-up through the kit's reader (tradeguard.service.read_settings).

Every variable is under the one prefix TRADEGUARD_AUDIT_; a bad value is refused naming the variable.

- DATABASE_URL: the log, `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/audit.db`) or `postgresql://…`.
- KEYVAULT_TARGET: host:port of the key vault (default 127.0.0.1:<the registry's key vault port>),
  KEYVAULT_SERVER_NAME: the name its certificate carries (default `keyvault`). The audit service calls it as
  workload `audit` to sign its checkpoints.
- CHECKPOINT_KEY (default `audit/checkpoint`): the key vault's Ed25519 key that signs the checkpoints (`tradeguard
  up` creates it as ops when missing; the key vault's policy lets `audit` sign with `audit/*` keys and read their
  public versions).
- ORIGIN (default `tradeguard.local/audit`): the checkpoints' origin line, also the signed note's key name: a
  schemaless URL of 1 to 255 characters of A-Z a-z 0-9 . _ / : - (C2SP tlog-checkpoint, signed-note).
- CHECKPOINT_INTERVAL_S (default 1, 0.01..1): while the log grows, a checkpoint is signed at most this often (and
  so at least every second while events arrive).
- RETENTION_DAYS (default 2557, 7 years: SEC 17a-4 and MiFID II record keeping; 1..36500): an entry is archived
  and removed from the database only once its RECORD time is older than this (services/audit/retention.py). The
  database keeps the longest period ever configured and enforces it itself: a shorter setting is logged at
  start-up and the longer one kept.
- ARCHIVE_DIR (default `$TRADEGUARD_HOME/archive/audit`): where the archive segments are written (owner-only).
- RETENTION_INTERVAL_S (default 3600, 1..86400): how often the retention task looks for expired entries.
- GUARD_WORKLOADS: workload names (comma-separated) allowed to record (Append, AppendBatch) besides trading,
  auth, the key vault and the rate limiter: a firm's own guarded services.

Plus the shared server settings (ServerConfig.from_env).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tradeguard.mesh.server import ServerConfig
from tradeguard.registry import lookup
from tradeguard.service import CommonSettings
from tradeguard.settings import Env, SettingsError

__all__ = [
    "DEFAULT_CHECKPOINT_KEY",
    "DEFAULT_ORIGIN",
    "DEFAULT_RETENTION_DAYS",
    "ORIGIN_PATTERN",
    "Settings",
]

DEFAULT_CHECKPOINT_KEY: Final = "audit/checkpoint"
DEFAULT_ORIGIN: Final = "tradeguard.local/audit"
DEFAULT_RETENTION_DAYS: Final = 2557  # 7 years (SEC 17a-4, MiFID II)
ORIGIN_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,254}")
_KEY_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}")
_DNS_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    keyvault_target: str = f"127.0.0.1:{lookup('keyvault').port}"
    keyvault_server_name: str = "keyvault"
    checkpoint_key: str = DEFAULT_CHECKPOINT_KEY
    origin: str = DEFAULT_ORIGIN
    checkpoint_interval_s: float = 1.0
    guard_workloads: frozenset[str] = frozenset()  # besides trading, auth, keyvault, ratelimit
    retention_days: int = DEFAULT_RETENTION_DAYS
    archive_dir: Path | None = None  # None: the server's home / archive / audit
    retention_interval_s: float = 3600.0

    @property
    def archive_path(self) -> Path:
        """The archive directory (ARCHIVE_DIR, else `$TRADEGUARD_HOME/archive/audit`)."""
        return self.archive_dir or self.server.home / "archive" / "audit"

    @classmethod
    def read(cls, env: Env, common: CommonSettings) -> Settings:
        """The audit service's own settings (see the module docstring) on top of the common ones."""
        return cls(
            server=common.server,
            database_url=common.database_url,
            keyvault_target=env.target("KEYVAULT_TARGET", f"127.0.0.1:{lookup('keyvault').port}"),
            keyvault_server_name=_matching(env, "KEYVAULT_SERVER_NAME", "keyvault", _DNS_NAME, "a DNS name"),
            checkpoint_key=_matching(
                env,
                "CHECKPOINT_KEY",
                DEFAULT_CHECKPOINT_KEY,
                _KEY_NAME,
                "a key vault key name ([a-z0-9._/-], at most 128)",
            ),
            origin=_matching(
                env, "ORIGIN", DEFAULT_ORIGIN, ORIGIN_PATTERN, "1 to 255 characters of A-Z a-z 0-9 . _ / : -"
            ),
            checkpoint_interval_s=env.number("CHECKPOINT_INTERVAL_S", 1.0, low=0.01, high=1.0),
            guard_workloads=env.workloads("GUARD_WORKLOADS"),
            retention_days=env.integer("RETENTION_DAYS", DEFAULT_RETENTION_DAYS, low=1, high=36_500),
            archive_dir=_directory(env, "ARCHIVE_DIR", common.server.home / "archive" / "audit"),
            retention_interval_s=env.number("RETENTION_INTERVAL_S", 3600.0, low=1.0, high=86_400.0),
        )


def _matching(env: Env, key: str, default: str, pattern: re.Pattern[str], what: str) -> str:
    value = env.text(key, default)
    if pattern.fullmatch(value) is None:
        raise SettingsError(f"{env.name(key)} must be {what}, got {value!r}")
    return value


def _directory(env: Env, key: str, default: Path) -> Path:
    value = env.text(key, str(default))
    if not value.strip() or not value.isprintable():
        raise SettingsError(f"{env.name(key)} must be a directory's path, got {value!r}")
    return Path(value)
