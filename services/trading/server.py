"""Wiring of the trading service: settings → store → core → servicer → MeshServer."""

from __future__ import annotations

import asyncio

from services.trading import policy
from services.trading.core import TradingCore, new_order_id
from services.trading.servicer import TradingServicer
from services.trading.settings import Settings
from services.trading.store import OrderStore
from services.trading.store_postgres import PostgresOrderStore
from services.trading.store_sqlite import SqliteOrderStore
from tradeguard.mesh import pki
from tradeguard.mesh.server import MeshServer, Service, serve
from tradeguard.observability.logging import configure_logging
from tradeguard.observability.tracing import configure_tracing
from tradeguard.storage import clock_us, sqlite_path
from tradeguard.trading.v1 import trading_pb2_grpc

FULL_NAME = "tradeguard.trading.v1.TradingService"


async def open_store(url: str) -> OrderStore:
    path = sqlite_path(url)
    if path is not None:
        return await SqliteOrderStore.open(path)
    return await PostgresOrderStore.open(url)


async def build(settings: Settings) -> tuple[MeshServer, OrderStore]:
    store = await open_store(settings.database_url)
    core = TradingCore(store, clock_us=clock_us, new_order_id=new_order_id)
    servicer = TradingServicer(core)
    trust_domain = pki.trust_domain(settings.server.pki)
    server = MeshServer(
        settings.server,
        policy.policy(trust_domain),
        [Service(FULL_NAME, lambda s: trading_pb2_grpc.add_TradingServiceServicer_to_server(servicer, s))],
    )
    return server, store


async def run(settings: Settings) -> None:
    server, store = await build(settings)
    await serve(server, on_stop=store.close)


def main() -> None:
    configure_logging()
    settings = Settings.from_env()
    configure_tracing(settings.server.name, settings.server.otlp_endpoint)
    asyncio.run(run(settings))
