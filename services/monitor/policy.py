"""Which workloads may call which monitor method (deny by default). The one place to change it.

- Reading (ListAlerts, WatchAlerts, GetStatus): operators (`ops`: `tradeguard alerts list|watch`).
- Acknowledging (AcknowledgeAlert): operators only (`tradeguard alerts ack`); the acknowledgement names the
  caller's workload.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ADMIN", "RULES", "SERVICE"]

SERVICE: Final = "/tradeguard.monitor.v1.MonitorService"
ADMIN: Final = frozenset({"ops"})

RULES: Final[dict[str, frozenset[str]]] = {
    f"{SERVICE}/ListAlerts": ADMIN,
    f"{SERVICE}/WatchAlerts": ADMIN,
    f"{SERVICE}/GetStatus": ADMIN,
    f"{SERVICE}/AcknowledgeAlert": ADMIN,
}
