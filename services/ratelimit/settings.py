"""Rate-limit service settings, read once at start-up through the kit's reader (tradeguard.service.read_settings).

Every variable is under the one prefix TRADEGUARD_RATELIMIT_; a bad value is refused naming the variable.

- LIMITS_FILE: the limits (YAML, services/ratelimit/limits_file.py), default `$TRADEGUARD_HOME/config/limits.yaml`
  (`tradeguard up` installs the packaged default there, owner-only, when it is absent). The service refuses to
  start when the file is missing or invalid; once running, a bad edit keeps the last good limits (GetLimits says
  so) and a good one takes effect within RELOAD_INTERVAL_S.
- RELOAD_INTERVAL_S (default 1, 0.1..3600): how often the file is looked at for changes.
- REDIS_URL (optional; `…_URL_FILE` for a URL holding a password), REDIS_PASSWORD (preferably
  REDIS_PASSWORD_FILE): the counters in Redis or a Redis Cluster (`redis+cluster://…`), shared by replicas; unset:
  in process (one replica). See tradeguard.storage.redis for the URL's options.
- STORE_TIMEOUT_MS (default 50, 1..5000): how long a decision waits for the counter store; past it, each limit's
  fail mode decides (fail-closed limits refuse, fail-open limits allow).
- MAX_COUNTERS (default 1,000,000, 1..100,000,000): the in-process counters' bound (ignored with Redis); a new
  subject beyond it is decided by the fail modes, never by forgetting someone's counts.
- GUARD_WORKLOADS: workload names (comma-separated) allowed to run a guard's quota stage against this service
  (CheckQuota, CheckQuotaBatch) besides the reference trading service: a firm's own guarded services.
- DATABASE_URL is read as for every service but unused: the rate limiter keeps no records.

Plus the shared server settings (ServerConfig.from_env).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.ratelimit.counters_memory import DEFAULT_MAX_COUNTERS
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import CommonSettings
from tradeguard.settings import Env, SettingsError
from tradeguard.storage.redis import RedisConfig

__all__ = ["DEFAULT_RELOAD_INTERVAL_S", "DEFAULT_STORE_TIMEOUT_S", "Settings", "default_limits_file"]

DEFAULT_STORE_TIMEOUT_S: Final = 0.05
DEFAULT_RELOAD_INTERVAL_S: Final = 1.0


def default_limits_file(home: Path) -> Path:
    """Where the limits file is looked for when LIMITS_FILE is unset (and where `tradeguard up` installs it)."""
    return home / "config" / "limits.yaml"


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str  # the runner's protocol; the rate limiter keeps no records
    limits_file: Path
    redis: RedisConfig | None = None  # None: counters in process
    store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S
    reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S
    max_counters: int = DEFAULT_MAX_COUNTERS
    guard_workloads: frozenset[str] = frozenset()  # besides the reference trading service

    @classmethod
    def read(cls, env: Env, common: CommonSettings) -> Settings:
        """The rate-limit service's own settings (see the module docstring) on top of the common ones."""
        return cls(
            server=common.server,
            database_url=common.database_url,
            limits_file=_limits_file(env, common.server.home),
            redis=RedisConfig.from_env(env),
            store_timeout_s=env.integer("STORE_TIMEOUT_MS", 50, low=1, high=5000) / 1000,
            reload_interval_s=env.number(
                "RELOAD_INTERVAL_S", DEFAULT_RELOAD_INTERVAL_S, low=0.1, high=3600.0
            ),
            max_counters=env.integer("MAX_COUNTERS", DEFAULT_MAX_COUNTERS, low=1, high=100_000_000),
            guard_workloads=env.workloads("GUARD_WORKLOADS"),
        )


def _limits_file(env: Env, home: Path) -> Path:
    raw = env.raw("LIMITS_FILE")
    if raw is None:
        return default_limits_file(home)
    if raw != raw.strip() or not raw.isprintable():
        raise SettingsError(f"{env.name('LIMITS_FILE')} must be a path without outer spaces, got {raw!r}")
    return Path(raw).expanduser().resolve()
