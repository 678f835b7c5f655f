"""The one registry of Tradeguard's services: name, default port, module, gRPC service name.

Settings (`TRADEGUARD_<NAME>_PORT`), `tradeguard up` (what it starts, in which order) and the command line (where it
calls) all read it, so a port or a name is written down once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["SERVICES", "SUITE", "Registered", "env_prefix", "lookup"]


@dataclass(frozen=True, slots=True)
class Registered:
    name: str  # the workload name: its certificate's SPIFFE ID is spiffe://<trust-domain>/svc/<name>
    port: int  # default port; TRADEGUARD_<NAME>_PORT overrides it
    module: str  # `python -m <module>` runs it
    full_name: str  # the gRPC service it serves

    @property
    def metrics_port(self) -> int:
        """Default Prometheus port under `tradeguard up`: the service port + 1000."""
        return self.port + 1000


SERVICES: Final[dict[str, Registered]] = {
    entry.name: entry
    for entry in (
        Registered("auth", 50051, "services.auth", "tradeguard.auth.v1.AuthService"),
        Registered("ratelimit", 50052, "services.ratelimit", "tradeguard.ratelimit.v1.RateLimitService"),
        Registered("audit", 50053, "services.audit", "tradeguard.audit.v1.AuditService"),
        Registered("keyvault", 50054, "services.keyvault", "tradeguard.keyvault.v1.KeyVaultService"),
        Registered("trading", 50055, "services.trading", "tradeguard.trading.v1.TradingService"),
        Registered("monitor", 50056, "services.monitor", "tradeguard.monitor.v1.MonitorService"),
    )
}

# What `tradeguard up` starts, in start order (a service starts after those it calls). Services not built yet
# are registered above (their ports are reserved) but not started.
SUITE: Final[tuple[str, ...]] = ("keyvault", "audit", "auth", "ratelimit", "trading", "monitor")


def env_prefix(name: str) -> str:
    """`TRADEGUARD_<NAME>`: the one prefix of a service's settings."""
    return f"TRADEGUARD_{name.upper()}"


def lookup(name: str) -> Registered:
    try:
        return SERVICES[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(SERVICES)}") from None
