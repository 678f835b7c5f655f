"""Trading service settings, read once at start-up through the kit's reader (tradeguard.service.read_settings).

TRADEGUARD_TRADING_DATABASE_URL: `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/trading.db`) or
`postgresql://…`; plus the shared server settings (tradeguard.mesh.server.ServerConfig.from_env) and the guard's
(tradeguard.guard.config.GuardSettings: TRADEGUARD_TRADING_AUTH_TARGET, _JWT_ISSUER, _JWT_AUDIENCE, ...; the quota
stage is on by default: TRADEGUARD_TRADING_RATELIMIT_TARGET, default 127.0.0.1:50052, and TRADEGUARD_TRADING_QUOTA
to switch it off; so is the audit stage, every call recorded by the audit service before its response is released:
TRADEGUARD_TRADING_AUDIT_TARGET, default 127.0.0.1:50053, and TRADEGUARD_TRADING_AUDIT to switch it off).

Pre-trade risk (`RiskSettings`, services/trading/controls.py):
- TRADEGUARD_TRADING_RISK: the pre-trade risk checks on PlaceOrder (default on). Off, only the kill switch
  applies (it is never off).
- TRADEGUARD_TRADING_RISK_FILE: the risk limits file (tradeguard/risk/config.py's format), hot-reloaded; default
  `$TRADEGUARD_HOME/config/risk.yaml` if that file exists, else the packaged tradeguard/risk/risk.yaml.
- TRADEGUARD_TRADING_REFERENCE_PRICE_MAX_AGE_S: a reference price set over the API (SetReferencePrice) older
  than this is stale (orders that need it are refused, fail closed); default 60, 0 = never stale. The file's
  static `reference_prices` never go stale (development prices for the embedded default).

A `Settings` built in code (tests, benchmarks) has the risk checks OFF unless given `risk=RiskSettings(...)`:
only the environment's reading defaults them on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import tradeguard.risk
from tradeguard.guard.config import GuardSettings
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import CommonSettings
from tradeguard.settings import Env

PACKAGED_RISK_FILE: Final = Path(tradeguard.risk.__file__).parent / "risk.yaml"
DEFAULT_PRICE_MAX_AGE_S: Final = 60.0


def default_risk_file(home: Path) -> Path:
    """`$TRADEGUARD_HOME/config/risk.yaml` if it exists, else the packaged example."""
    own = home / "config" / "risk.yaml"
    return own if own.is_file() else PACKAGED_RISK_FILE


@dataclass(frozen=True)
class RiskSettings:
    enabled: bool = False
    file: Path = PACKAGED_RISK_FILE
    price_max_age_s: float = DEFAULT_PRICE_MAX_AGE_S  # 0: never stale
    reload_interval_s: float = 1.0  # how often the risk file is looked at
    poll_interval_s: float = 0.2  # how often the store's control version is looked at

    @classmethod
    def read(cls, own: Env, home: Path) -> RiskSettings:
        return cls(
            enabled=own.flag("RISK", True),
            file=own.path("RISK_FILE", default_risk_file(home)),
            price_max_age_s=own.number(
                "REFERENCE_PRICE_MAX_AGE_S", DEFAULT_PRICE_MAX_AGE_S, low=0.0, high=86_400.0
            ),
        )


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    guard: GuardSettings = field(default_factory=GuardSettings)
    risk: RiskSettings = field(default_factory=RiskSettings)

    @classmethod
    def read(cls, own: Env, common: CommonSettings) -> Settings:
        return cls(
            server=common.server,
            database_url=common.database_url,
            guard=GuardSettings.read(own),
            risk=RiskSettings.read(own, common.server.home),
        )
