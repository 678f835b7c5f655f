"""The trading service for benchmarks, in its own process, in three modes:

- `plain`: the servicer, store and interceptor chain (minus caller authorisation: there is no peer
  identity without TLS) on plain TCP;
- `mtls`: exactly the same on a mutual-TLS port (the transport's cost alone);
- `mesh`: the real service (services.trading.service.SERVICE, run by the kit's runner): mTLS plus SPIFFE
  authorisation.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import argparse
import asyncio
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from services.trading.core import TradingCore, new_order_id
from services.trading.service import SERVICE
from services.trading.servicer import TradingServicer
from services.trading.settings import Settings
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import ServerConfig, interceptors
from tradeguard.observability.metrics import RpcMetrics
from tradeguard.service import serve
from tradeguard.storage import clock_us
from tradeguard.trading.v1 import trading_pb2_grpc


async def unguarded(port: int, db: str, home: Path, secure: bool) -> None:
    store = await SERVICE.stores.open(db)
    servicer = TradingServicer(TradingCore(store, clock_us=clock_us, new_order_id=new_order_id))
    metrics = RpcMetrics("trading", CollectorRegistry())
    server = grpc.aio.server(interceptors=interceptors("trading", metrics, None))
    trading_pb2_grpc.add_TradingServiceServicer_to_server(servicer, server)
    if secure:
        creds, _ = tls.server_credentials(tls.Workload.of(pki.PkiPaths(home), "trading"))
        server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def mesh(port: int, db: str, home: Path) -> None:
    settings = Settings(server=ServerConfig(name="trading", port=port, home=home), database_url=db)
    await serve(SERVICE, settings)


def main() -> None:
    from tradeguard.observability.logging import configure_logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["plain", "mtls", "mesh"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args()
    configure_logging(json=True)
    if args.mode == "mesh":
        asyncio.run(mesh(args.port, args.db, args.home))
    else:
        asyncio.run(unguarded(args.port, args.db, args.home, secure=args.mode == "mtls"))


if __name__ == "__main__":
    main()
