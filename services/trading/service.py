"""The trading service, declared once: the kit's runner (tradeguard.service) turns this into a running server."""

from __future__ import annotations

from services.trading import policy
from services.trading.controls import TradingControls
from services.trading.core import TradingCore, new_order_id
from services.trading.servicer import TradingServicer
from services.trading.settings import Settings
from services.trading.store import OrderStore
from services.trading.store_postgres import PostgresOrderStore
from services.trading.store_sqlite import SqliteOrderStore
from tradeguard.risk.config import RiskFile
from tradeguard.service import Assembly, Declaration, Stores, Wiring
from tradeguard.storage import clock_us
from tradeguard.trading.v1 import trading_pb2_grpc


async def build(wiring: Wiring[Settings, OrderStore]) -> Assembly:
    risk = wiring.settings.risk
    risk_file = RiskFile(risk.file, clock_us)  # refuses to start without valid limits
    controls = TradingControls(
        wiring.store,
        lambda: risk_file.current,
        clock_us=clock_us,
        risk=risk.enabled,
        price_max_age_us=round(risk.price_max_age_s * 1_000_000),
    )
    await controls.refresh()  # engaged switches are in force before the first call
    core = TradingCore(wiring.store, clock_us=clock_us, new_order_id=new_order_id, controls=controls)

    async def follow() -> None:
        await controls.follow(risk.poll_interval_s)

    async def watch() -> None:
        await risk_file.watch(risk.reload_interval_s)

    return Assembly(TradingServicer(core), tasks=[follow, watch], core=core)


SERVICE: Declaration[Settings, OrderStore] = Declaration(
    name="trading",
    summary="The reference trading service: orders, idempotent by (account_id, client_order_id).",
    register=trading_pb2_grpc.add_TradingServiceServicer_to_server,
    rules=policy.RULES,
    permissions=policy.PERMISSIONS,
    effect_methods=policy.EFFECTS,
    settings=Settings.read,
    stores=Stores(sqlite=SqliteOrderStore.open, postgres=PostgresOrderStore.open),
    build=build,
)
