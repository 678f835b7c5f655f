"""Which workloads may call which trading method, and which permission each needs (both deny by default).

`RULES` is the mesh's gate (the caller's workload); `PERMISSIONS` is the guard's (the verified principal's
permission, tradeguard.guard). The one place to change either."""

from __future__ import annotations

SERVICE = "/tradeguard.trading.v1.TradingService"

# ops: operators (grpcurl, the CLI); edge: the Envoy front proxy; trading-client: firm trading bots.
RULES: dict[str, frozenset[str]] = {
    f"{SERVICE}/PlaceOrder": frozenset({"ops", "edge", "trading-client"}),
    f"{SERVICE}/CancelOrder": frozenset({"ops", "edge", "trading-client"}),
    f"{SERVICE}/GetOrder": frozenset({"ops", "edge", "trading-client", "monitor"}),
    f"{SERVICE}/ListOrders": frozenset({"ops", "edge", "trading-client", "monitor"}),
}

# The permission the principal needs per method (the guard refuses any method not listed).
PERMISSIONS: dict[str, str] = {
    f"{SERVICE}/PlaceOrder": "orders:write",
    f"{SERVICE}/CancelOrder": "orders:write",
    f"{SERVICE}/GetOrder": "orders:read",
    f"{SERVICE}/ListOrders": "orders:read",
}
