"""Which workloads may call which trading method (deny by default). The one place to change it."""

from __future__ import annotations

SERVICE = "/tradeguard.trading.v1.TradingService"

# ops: operators (grpcurl, the CLI); edge: the Envoy front proxy; trading-client: firm trading bots.
RULES: dict[str, frozenset[str]] = {
    f"{SERVICE}/PlaceOrder": frozenset({"ops", "edge", "trading-client"}),
    f"{SERVICE}/CancelOrder": frozenset({"ops", "edge", "trading-client"}),
    f"{SERVICE}/GetOrder": frozenset({"ops", "edge", "trading-client", "monitor"}),
    f"{SERVICE}/ListOrders": frozenset({"ops", "edge", "trading-client", "monitor"}),
}
