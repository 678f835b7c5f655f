"""Pre-trade risk checks (SEC 15c3-5, MiFID II RTS 6) any trading service can call, in process.

- `model`: the order as the checks see it, an account's limits, the config, the rejection (`RiskRejected`);
- `checks`: `RiskEngine.check(order, open_notional)` and the pure `credit_check`;
- `reference`: the reference price seam (`ReferencePrices`) and the in-process `PriceFeed`;
- `config`: the per-account YAML file (`parse_risk`) and `RiskFile`, hot-reloaded.

No grpc, no protobuf, no database: a trading service maps its request to a `RiskOrder`, and the kit's error
mapping turns a `RiskRejected` into FAILED_PRECONDITION with an ErrorInfo.
"""
