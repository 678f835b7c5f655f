"""Which workloads may call which trading method, and which permission each needs (both deny by default).

`RULES` is the mesh's gate (the caller's workload); `PERMISSIONS` is the guard's (the verified principal's
permission, tradeguard.guard). The one place to change either."""

from __future__ import annotations

SERVICE = "/tradeguard.trading.v1.TradingService"

# ops: operators (grpcurl, the CLI); edge: the Envoy front proxy; trading-client: firm trading bots; marketdata:
# the market-data publisher that feeds reference prices.
RULES: dict[str, frozenset[str]] = {
    f"{SERVICE}/PlaceOrder": frozenset({"ops", "edge", "trading-client"}),
    f"{SERVICE}/CancelOrder": frozenset({"ops", "edge", "trading-client"}),
    f"{SERVICE}/GetOrder": frozenset({"ops", "edge", "trading-client", "monitor"}),
    f"{SERVICE}/ListOrders": frozenset({"ops", "edge", "trading-client", "monitor"}),
    # the monitor engages it by its own policy (services/monitor), signed with its own risk-officer key
    f"{SERVICE}/EngageKillSwitch": frozenset({"ops", "edge", "monitor"}),
    f"{SERVICE}/ReleaseKillSwitch": frozenset({"ops", "edge"}),
    f"{SERVICE}/ListKillSwitches": frozenset({"ops", "edge", "monitor"}),
    f"{SERVICE}/SetReferencePrice": frozenset({"ops", "edge", "marketdata"}),
    f"{SERVICE}/GetRiskLimits": frozenset({"ops", "edge", "monitor"}),
    f"{SERVICE}/SetRiskLimits": frozenset({"ops", "edge"}),
}

# The permission the principal needs per method (the guard refuses any method not listed).
PERMISSIONS: dict[str, str] = {
    f"{SERVICE}/PlaceOrder": "orders:write",
    f"{SERVICE}/CancelOrder": "orders:write",
    f"{SERVICE}/GetOrder": "orders:read",
    f"{SERVICE}/ListOrders": "orders:read",
    f"{SERVICE}/EngageKillSwitch": "trading:halt",
    f"{SERVICE}/ReleaseKillSwitch": "trading:halt",  # and a fresh second factor (services/trading/controls.py)
    f"{SERVICE}/ListKillSwitches": "trading:halt",
    f"{SERVICE}/SetReferencePrice": "risk:manage",
    f"{SERVICE}/GetRiskLimits": "risk:manage",
    f"{SERVICE}/SetRiskLimits": "risk:manage",
}

# The methods that take effect (change state): their audit event is durable before the handler runs
# (tradeguard.guard.audit, write-ahead), so a crash never leaves an order, a cancel, a switch or a limit unrecorded.
EFFECTS: frozenset[str] = frozenset(
    f"{SERVICE}/{method}"
    for method in (
        "PlaceOrder",
        "CancelOrder",
        "EngageKillSwitch",
        "ReleaseKillSwitch",
        "SetReferencePrice",
        "SetRiskLimits",
    )
)
