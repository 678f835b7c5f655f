"""Trading service settings, read once at start-up through the kit's reader (tradeguard.service.read_settings).

TRADEGUARD_TRADING_DATABASE_URL: `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/trading.db`) or
`postgresql://…`; plus the shared server settings (tradeguard.mesh.server.ServerConfig.from_env) and the guard's
(tradeguard.guard.config.GuardSettings: TRADEGUARD_TRADING_AUTH_TARGET, _JWT_ISSUER, _JWT_AUDIENCE, ...; the quota
stage is on by default: TRADEGUARD_TRADING_RATELIMIT_TARGET, default 127.0.0.1:50052, and TRADEGUARD_TRADING_QUOTA
to switch it off; so is the audit stage, every call recorded by the audit service before its response is released:
TRADEGUARD_TRADING_AUDIT_TARGET, default 127.0.0.1:50053, and TRADEGUARD_TRADING_AUDIT to switch it off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tradeguard.guard.config import GuardSettings
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import CommonSettings
from tradeguard.settings import Env


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    guard: GuardSettings = field(default_factory=GuardSettings)

    @classmethod
    def read(cls, own: Env, common: CommonSettings) -> Settings:
        return cls(server=common.server, database_url=common.database_url, guard=GuardSettings.read(own))
