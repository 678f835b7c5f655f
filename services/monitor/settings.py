"""Monitor service settings, read once at start-up through the kit's reader (tradeguard.service.read_settings).

Every variable is under the one prefix TRADEGUARD_MONITOR_; a bad value is refused naming the variable.

- CONFIG_FILE: the detectors and the action policy (YAML, services/monitor/core/config.py), default
  `$TRADEGUARD_HOME/config/monitor.yaml` when that file exists, else the packaged default
  (services/monitor/monitor.yaml). The service refuses to start when it is invalid; once running, a bad edit keeps
  the last good configuration (GetStatus says why) and a good one takes effect within RELOAD_INTERVAL_S.
- RELOAD_INTERVAL_S (default 1, 0.1..3600).
- AUDIT_TARGET (default 127.0.0.1:<the registry's audit port>), AUDIT_SERVER_NAME (default `audit`): the audit
  service whose Tail the monitor follows (as workload `monitor`, a reader there) and where it records its actions
  (a recorder there: services/audit/policy.py RECORDERS).
- AUTH_TARGET, AUTH_SERVER_NAME (default the registry's auth port, `auth`): where keys are revoked
  (AuthService/RevokeApiKey, allowed to workload `monitor` by the auth service's policy).
- TRADING_TARGET, TRADING_SERVER_NAME (default the registry's trading port, `trading`) and
  KILL_SWITCH_CREDENTIALS_FILE: the kill switch (TradingService/EngageKillSwitch) is a guarded call: the monitor
  signs it with the API key of a user holding `trading:halt` (role `risk-officer`), read from this owner-only
  JSON file `{"key_id": "...", "secret": "..."}` (`tradeguard up` writes `$TRADEGUARD_HOME/secrets/monitor-key.json`;
  the default path). No file: kill-switch actions are SKIPPED (said so in the alert).
- WEBHOOK_URL (optional, http:// or https://) and WEBHOOK_SECRET (preferably WEBHOOK_SECRET_FILE): each alert
  POSTed as JSON, signed: headers `x-tradeguard-timestamp` (µs since the epoch) and `x-tradeguard-signature`
  (lowercase hex HMAC-SHA256 of "<timestamp>.<body>" with the secret); a receiver refuses stale timestamps.
- SYSLOG_TARGET (optional, host:port): each alert as an RFC 5424 message over UDP.
- MAX_BATCH (default 500, 1..10,000): audit entries processed per transaction at most.
- REPLAY_ENTRIES (default 10,000, 0..1,000,000): entries before the stored position read again at start-up to warm
  the detectors up (what they trigger is dropped: see services/monitor/core/engine.py), so that a burst or a
  baseline straddling a restart is not lost. Larger than the entries of the longest window is right.
- WATCHERS (default 64, 1..10,000): concurrent WatchAlerts streams at most.

Plus the shared server settings (ServerConfig.from_env) and DATABASE_URL (SQLite `$TRADEGUARD_HOME/data/
monitor.db` by default, or PostgreSQL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Final

from tradeguard.mesh.server import ServerConfig
from tradeguard.registry import lookup
from tradeguard.service import CommonSettings
from tradeguard.settings import Env, SettingsError

__all__ = ["Settings", "credentials_file", "packaged_config"]

DEFAULT_RELOAD_INTERVAL_S: Final = 1.0


def packaged_config() -> Path:
    """The packaged default configuration (services/monitor/monitor.yaml)."""
    return Path(str(resources.files("services.monitor") / "monitor.yaml"))


def credentials_file(home: Path) -> Path:
    """Where `tradeguard up` writes the monitor's API key (and where the monitor looks by default)."""
    return home / "secrets" / "monitor-key.json"


def _local(name: str) -> str:
    return f"127.0.0.1:{lookup(name).port}"


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    config_file: Path
    reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S
    audit_target: str = _local("audit")
    audit_server_name: str = "audit"
    auth_target: str = _local("auth")
    auth_server_name: str = "auth"
    trading_target: str = _local("trading")
    trading_server_name: str = "trading"
    kill_switch_credentials: Path | None = None
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)  # never in a log line or a traceback's locals
    syslog_target: str = ""
    max_batch: int = 500
    replay_entries: int = 10_000
    watchers: int = 64

    @classmethod
    def read(cls, env: Env, common: CommonSettings) -> Settings:
        home = common.server.home
        webhook = env.text("WEBHOOK_URL", "")
        if webhook and not webhook.startswith(("http://", "https://")):
            raise SettingsError(f"{env.name('WEBHOOK_URL')} must be an http:// or https:// URL")
        secret = env.secret("WEBHOOK_SECRET") or ""
        if webhook and len(secret) < 16:
            raise SettingsError(
                f"{env.name('WEBHOOK_URL')} needs {env.name('WEBHOOK_SECRET')}_FILE: a secret of 16 characters or more"
            )
        syslog = env.text("SYSLOG_TARGET", "")
        if syslog and not _host_port(syslog):
            raise SettingsError(f"{env.name('SYSLOG_TARGET')} must be host:port, got {syslog!r}")
        credentials = env.optional_path("KILL_SWITCH_CREDENTIALS_FILE") or credentials_file(home)
        return cls(
            server=common.server,
            database_url=common.database_url,
            config_file=_config_file(env, home),
            reload_interval_s=env.number(
                "RELOAD_INTERVAL_S", DEFAULT_RELOAD_INTERVAL_S, low=0.1, high=3600.0
            ),
            audit_target=env.target("AUDIT_TARGET", _local("audit")),
            audit_server_name=env.text("AUDIT_SERVER_NAME", "audit"),
            auth_target=env.target("AUTH_TARGET", _local("auth")),
            auth_server_name=env.text("AUTH_SERVER_NAME", "auth"),
            trading_target=env.target("TRADING_TARGET", _local("trading")),
            trading_server_name=env.text("TRADING_SERVER_NAME", "trading"),
            kill_switch_credentials=credentials,
            webhook_url=webhook,
            webhook_secret=secret,
            syslog_target=syslog,
            max_batch=env.integer("MAX_BATCH", 500, low=1, high=10_000),
            replay_entries=env.integer("REPLAY_ENTRIES", 10_000, low=0, high=1_000_000),
            watchers=env.integer("WATCHERS", 64, low=1, high=10_000),
        )


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _config_file(env: Env, home: Path) -> Path:
    raw = env.raw("CONFIG_FILE")
    if raw is None:
        installed = home / "config" / "monitor.yaml"
        return installed if installed.exists() else packaged_config()
    if raw != raw.strip() or not raw.isprintable():
        raise SettingsError(f"{env.name('CONFIG_FILE')} must be a path without outer spaces, got {raw!r}")
    return Path(raw).expanduser().resolve()
