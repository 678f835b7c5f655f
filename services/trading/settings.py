"""Trading service settings, read once at start-up from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from tradeguard.mesh.server import ServerConfig
from tradeguard.storage import database_url

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
        url = database_url("TRADEGUARD_TRADING_DATABASE_URL", server.home / "data" / "trading.db")
        return cls(server=server, database_url=url)
