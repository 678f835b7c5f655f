"""Trading service settings, read once at start-up from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tradeguard.mesh.server import ServerConfig

NAME = "trading"
DEFAULT_PORT = 50055


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str

    @classmethod
    def from_env(cls) -> Settings:
        """TRADEGUARD_TRADING_DATABASE_URL: `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/trading.db`)
        or `postgresql://…`; plus the shared server settings (see ServerConfig.from_env)."""
        server = ServerConfig.from_env(NAME, DEFAULT_PORT)
        default_db = f"sqlite:///{server.home / 'data' / 'trading.db'}"
        url = os.environ.get("TRADEGUARD_TRADING_DATABASE_URL") or default_db
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("TRADEGUARD_TRADING_DATABASE_URL must start with sqlite:/// or postgresql://")
        return cls(server=server, database_url=url)
