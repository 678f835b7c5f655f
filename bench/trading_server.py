"""The trading service for benchmarks, in its own process, in five modes:

- `plain`: the servicer, store and interceptor chain (minus caller authorisation: there is no peer
  identity without TLS) on plain TCP;
- `mtls`: exactly the same on a mutual-TLS port (the transport's cost alone);
- `mesh`: the real service (services.trading.service.SERVICE, run by the kit's runner: mTLS plus SPIFFE
  authorisation) with its guard left out;
- `bare`: the real service's servicer and store exactly as its declaration builds them (its build function, so
  whatever the reference service's handler checks itself — its pre-trade risk checks — is in), on a plain
  grpc.aio server with the mesh's mutual-TLS credentials and NO interceptors at all (no chain, no policy, no
  log line, no metrics): the full chain's baseline (bench/full_chain.py). The principal is fixed in the server's
  context, which every RPC's task starts from;
- `guarded`: the real service exactly as declared, its guard included (`--auth-target`: the auth service); the
  guard's quota stage only with `--ratelimit-target` (the rate-limit service), its audit stage only with
  `--audit-target` (the audit service).

UNGUARDED modes (plain, mtls, mesh, bare): the trading handlers act only for a verified principal (every order belongs
to the principal's account, services/trading/core.py `account_of`), so in place of the guard these modes mount
`FixedPrincipal`, a layer that names one fixed principal (account `--account`, orders:read and orders:write)
for every call and checks nothing: a baseline for benchmarks, never a way to run a service.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from services.trading.core import TradingCore, new_order_id
from services.trading.service import SERVICE
from services.trading.servicer import TradingServicer
from services.trading.settings import RiskSettings, Settings
from tradeguard import eventloop
from tradeguard.guard.config import GuardSettings
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import ServerConfig, chain, mount
from tradeguard.observability.metrics import RpcMetrics
from tradeguard.principal import Principal, set_principal
from tradeguard.rpc.handlers import Context, Layer
from tradeguard.service import Assembly, Wiring, serve
from tradeguard.storage import clock_us
from tradeguard.trading.v1 import trading_pb2_grpc

MODES = ("plain", "mtls", "mesh", "bare", "guarded")
BENCH_ACCOUNT = "bench"


class FixedPrincipal(Layer):
    """The unguarded baseline: every call acts for one fixed principal (nothing is checked)."""

    def __init__(self, account: str) -> None:
        self.principal = Principal(
            user_id="bench-user", account_id=account, scopes=frozenset({"orders:read", "orders:write"})
        )

    async def before(self, context: Context, request: Any, raw: bytes) -> None:
        set_principal(self.principal)


async def unguarded(port: int, db: str, home: Path, secure: bool, account: str) -> None:
    store = await SERVICE.stores.open(db)
    servicer = TradingServicer(TradingCore(store, clock_us=clock_us, new_order_id=new_order_id))
    metrics = RpcMetrics("trading", CollectorRegistry())
    server = grpc.aio.server()
    kit_chain = chain("trading", metrics, None, layers=[FixedPrincipal(account)])
    trading_pb2_grpc.add_TradingServiceServicer_to_server(servicer, mount(server, kit_chain))
    if secure:
        creds, _ = tls.server_credentials(tls.Workload.of(pki.PkiPaths(home), "trading"))
        server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _risk(risk_file: Path | None) -> RiskSettings:
    """The pre-trade risk checks on with `risk_file`'s limits, or off (None)."""
    return RiskSettings() if risk_file is None else RiskSettings(enabled=True, file=risk_file)


async def bare(port: int, db: str, home: Path, account: str, risk_file: Path | None = None) -> None:
    """The declaration's servicer and store on a plain mTLS server with no interceptors (see the module)."""
    paths = pki.PkiPaths(home)
    settings = Settings(
        server=ServerConfig(name="trading", port=port, home=home),
        database_url=db,
        guard=GuardSettings(quota=False, audit=False),
        risk=_risk(risk_file),
    )
    store = await SERVICE.stores.open(db)
    assembly = await SERVICE.build(Wiring(settings, store, pki.trust_domain(paths)))
    tasks = [asyncio.create_task(task()) for task in assembly.tasks]
    await serve_plain(assembly.servicer, port, paths, account, tasks)


async def serve_plain(
    servicer: object,
    port: int,
    paths: pki.PkiPaths,
    account: str,
    tasks: Sequence[asyncio.Task[None]] = (),
) -> None:
    """`servicer` on a plain grpc.aio server with mutual TLS and no interceptors, every call acting for one fixed
    principal of `account`, until cancelled (then `tasks` are cancelled too)."""
    set_principal(FixedPrincipal(account).principal)  # each RPC's task starts from this context
    server = grpc.aio.server()
    SERVICE.register(servicer, server)
    creds, _ = tls.server_credentials(tls.Workload.of(paths, "trading"))
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        for task in tasks:
            task.cancel()


async def mesh(
    port: int,
    db: str,
    home: Path,
    account: str,
    auth_target: str | None,
    ratelimit_target: str | None = None,
    audit_target: str | None = None,
    fill_turns: int | None = None,
    risk_file: Path | None = None,
    fill_patience: int | None = None,
    write_ahead: bool = True,
) -> None:
    """The real declaration run by the kit's runner: with its guard (`auth_target` given), or with the guard
    replaced by `FixedPrincipal` (None)."""
    declaration = SERVICE
    if auth_target is None:
        build = SERVICE.build

        async def unguarded_build(wiring: Wiring[Settings, Any]) -> Assembly:
            assembly = await build(wiring)
            return replace(assembly, layers=[FixedPrincipal(account), *assembly.layers])

        declaration = replace(SERVICE, permissions=None, build=unguarded_build)
    guard = GuardSettings(quota=False, audit=False)
    if auth_target is not None:  # the quota and audit stages on only when their services are named
        guard = GuardSettings(
            auth_target=auth_target,
            quota=ratelimit_target is not None,
            ratelimit_target=ratelimit_target or GuardSettings.ratelimit_target,
            audit=audit_target is not None,
            audit_target=audit_target or GuardSettings.audit_target,
            fill_turns=GuardSettings.fill_turns if fill_turns is None else fill_turns,
            fill_patience=GuardSettings.fill_patience if fill_patience is None else fill_patience,
            audit_write_ahead=write_ahead,
        )
    settings = Settings(
        server=ServerConfig(name="trading", port=port, home=home),
        database_url=db,
        guard=guard,
        risk=_risk(risk_file),
    )
    await serve(declaration, settings)


def main() -> None:
    from tradeguard.observability.logging import configure_logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--account", default=BENCH_ACCOUNT, help="the fixed principal's account (unguarded)")
    parser.add_argument("--auth-target", help="host:port of the auth service (guarded mode)")
    parser.add_argument(
        "--ratelimit-target",
        help="host:port of the rate-limit service: the guard's quota stage on (guarded mode)",
    )
    parser.add_argument(
        "--audit-target", help="host:port of the audit service: the guard's audit stage on (guarded mode)"
    )
    parser.add_argument(
        "--fill-turns",
        type=int,
        help="event-loop turns the guard's quota and audit batches wait to fill (guarded)",
    )
    parser.add_argument(
        "--fill-patience",
        type=int,
        help="turns in a row with no new call that end a batch's filling (guarded)",
    )
    parser.add_argument(
        "--no-write-ahead",
        action="store_true",
        help="the audit stage appends beside the handler for every method (guarded; AUDIT_WRITE_AHEAD=false)",
    )
    parser.add_argument(
        "--risk-file",
        type=Path,
        help="the pre-trade risk checks on, with this limits file (bare, mesh, guarded)",
    )
    args = parser.parse_args()
    if (args.mode == "guarded") != (args.auth_target is not None):
        parser.error("--auth-target is required by, and only by, --mode guarded")
    configure_logging(json=True)
    if args.mode == "bare":
        eventloop.run(bare(args.port, args.db, args.home, args.account, args.risk_file))
    elif args.mode in ("mesh", "guarded"):
        eventloop.run(
            mesh(
                args.port,
                args.db,
                args.home,
                args.account,
                args.auth_target,
                args.ratelimit_target,
                args.audit_target,
                args.fill_turns,
                args.risk_file,
                args.fill_patience,
                not args.no_write_ahead,
            )
        )
    else:
        eventloop.run(unguarded(args.port, args.db, args.home, args.mode == "mtls", args.account))


if __name__ == "__main__":
    main()
