"""PlaceOrder with every pre-trade risk check on beside none, in one run, as a throughput ratio (issue 10: aim
under 5 % cost).

Three servers, each in its own process, of the same shape: the real trading service's servicer, core and store as
its declaration builds them (services/trading/service.py `build`, so whatever PlaceOrder does in the handler is
in), on a plain grpc.aio server with mutual TLS and no interceptors (no guard: it would be the same in all three,
and bench/full_chain.py measures it), each call acting for one fixed principal. They differ only in the controls:

  none   the core with no pre-trade controls at all (as before issue 10): validation and the insert
  kill   the kill switch only (TRADEGUARD_TRADING_RISK=0), none engaged: the store's admission (the switches
         re-checked under the store's lock, the order's notional kept) — what every order pays for the kill switch
  risk   every check on (the default): the risk engine (throttle, restricted symbols, maximum quantity, price
         collar around a reference price, maximum notional, duplicate detection) and the credit limit on the
         account's open notional inside the insert transaction (the idempotency lookup is the insert's own: a
         separate lookup is made only when a control refuses). Every order passes every check (the limits are
         wide, each order is distinct), so each check does its whole work.

Each server has its own SQLite database on tmpfs (/dev/shm) where there is one (the same code path commits; the
disk's fsync latency is left out: bench/trading_store.py measures durable commits), and polls it for control
changes every 200 ms as the service does. Rounds rotate the order of the servers so that drift hits all alike.
Each round measures every mode twice: saturated (closed loop, `--concurrency` callers: throughput and CPU per
call, client and server) and at a fixed arrival rate (open loop, `--rate` calls/s, 0: not measured: the server's
CPU per call under the same load for every mode, so that what the controls add is not mixed with how a
saturated server batches its work: at a low rate nothing is batched, and each call pays the whole path).
Printed: each round's figures, then the medians of the ratios to `none` (and of the server µs per call added).

    python -m bench.risk_trading [--concurrency 32] [--duration 5] [--rounds 5] [--rate 400]
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.loadgen import (
    Result,
    closed_loop,
    fixed_rate_server_cpu,
    free_port,
    load_arguments,
    median_cpu_ratio,
    median_ratio,
    tmpfs,
    until_answered,
)
from bench.mesh import dev_pki, mtls_channel
from tradeguard import eventloop
from tradeguard.mesh import pki, tls
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

MODES = ("none", "kill", "risk")
ACCOUNT = "bench"
RISK_FILE = """version: 1
defaults:
  max_quantity: 1000000
  max_notional: 1000000000000
  price_collar_bps: 1000
  credit_limit: 1000000000000000
  duplicate_window: 1s
  throttle: {messages: 10000, window: 1ms}
restricted_symbols: [GME, DOGE-USD]
reference_prices: {BTC-USD: 64000}
"""


# --- the server (a process of its own) ------------------------------------------------------------------


async def serve(mode: str, port: int, db: str, home: Path, risk_file: Path) -> None:
    """One mode's server: bench/trading_server.py's bare shape (the declaration's servicer and store, no
    interceptors, one fixed principal), the risk checks on with `risk_file` for `risk`, off for `kill`; for `none`
    the core alone, with no pre-trade controls at all."""
    from bench.trading_server import bare, serve_plain
    from services.trading.core import TradingCore, new_order_id
    from services.trading.service import SERVICE
    from services.trading.servicer import TradingServicer
    from tradeguard.storage import clock_us

    if mode == "none":
        store = await SERVICE.stores.open(db)
        core = TradingCore(store, clock_us=clock_us, new_order_id=new_order_id)
        await serve_plain(TradingServicer(core), port, pki.PkiPaths(home), ACCOUNT)
    else:
        await bare(port, db, home, ACCOUNT, risk_file if mode == "risk" else None)


# --- the client -----------------------------------------------------------------------------------------


def start(mode: str, port: int, home: Path, risk_file: Path) -> subprocess.Popen[bytes]:
    db = f"sqlite:///{home / f'{mode}.db'}"
    cmd = [sys.executable, "-m", "bench.risk_trading", "--serve", mode, "--port", str(port), "--db", db]
    return subprocess.Popen(
        [*cmd, "--home", str(home), "--risk-file", str(risk_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def ready(stub: trading_pb2_grpc.TradingServiceAsyncStub) -> None:
    await until_answered(lambda: stub.ListOrders(trading_pb2.ListOrdersRequest(), timeout=1), "server")


def caller(
    stub: trading_pb2_grpc.TradingServiceAsyncStub, tag: str, first: int = 0
) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> object:
        # distinct orders (never duplicates: each run of a round its own prices from `first` on), every one
        # inside the collar and under every limit
        return await stub.PlaceOrder(
            trading_pb2.PlaceOrderRequest(
                client_order_id=f"{tag}-{i}",
                symbol="BTC-USD",
                side=trading_pb2.SIDE_BUY,
                type=trading_pb2.ORDER_TYPE_LIMIT,
                quantity="0.01",
                price=f"64000.{first + i:08d}",
            ),
            timeout=10,
        )

    return call


async def run(concurrency: int, duration: float, rounds: int, rate: int) -> None:
    with tempfile.TemporaryDirectory(dir=tmpfs()) as tmp:
        home = Path(tmp)
        paths = dev_pki(home, ("trading", "ops"))
        risk_file = home / "risk.yaml"
        risk_file.write_text(RISK_FILE)
        ports = {mode: free_port() for mode in MODES}
        procs = {mode: start(mode, port, home, risk_file) for mode, port in ports.items()}
        try:
            ops = tls.Workload.of(paths, "ops")
            channels = {mode: mtls_channel(port, "trading", ops) for mode, port in ports.items()}
            stubs = {mode: trading_pb2_grpc.TradingServiceStub(channel) for mode, channel in channels.items()}
            for stub in stubs.values():
                await ready(stub)
            results: dict[str, list[Result]] = {mode: [] for mode in MODES}
            fixed_us: dict[str, list[float]] = {mode: [] for mode in MODES}
            print(
                f"PlaceOrder, {concurrency} concurrent callers, {duration:.0f} s per round, {rounds} rounds; "
                "the service's handler and store, mTLS, no interceptors, SQLite on tmpfs"
            )
            for r in range(rounds):
                for mode in MODES[r % 3 :] + MODES[: r % 3]:
                    res = await closed_loop(
                        caller(stubs[mode], f"{mode}{r}"),
                        concurrency=concurrency,
                        duration=duration,
                        cpu_of=[procs[mode].pid],
                    )
                    if res.errors:
                        raise RuntimeError(f"{mode}: {res.errors} calls failed: every order should pass")
                    results[mode].append(res)
                    line = res.line(f"round {r + 1} {mode}")
                    if rate:
                        fixed = await fixed_rate_server_cpu(
                            caller(stubs[mode], f"{mode}{r}f", 50_000_000),
                            procs[mode].pid,
                            rate,
                            min(duration, 3.0),
                        )
                        fixed_us[mode].append(fixed)
                        line += f"   server at {rate}/s {fixed:5.0f} us/call"
                    print(line)
            print("\nthroughput against `none` (median of rounds):")
            for mode in ("kill", "risk"):
                ratio = median_ratio(results[mode], results["none"])
                print(f"  {mode:<5} {ratio:.3f}  -> costs {(1 - ratio) * 100:5.1f} %")
            ratio = median_ratio(results["risk"], results["kill"])
            print(f"  risk checks alone (risk against kill): {ratio:.3f}  -> cost {(1 - ratio) * 100:5.1f} %")
            print(
                "CPU per call, client and server, against `none` (median of rounds; steadier than throughput):"
            )
            for mode in ("kill", "risk"):
                cpu = median_cpu_ratio(results[mode], results["none"])
                print(f"  {mode:<5} {cpu:.3f}  -> costs {(cpu - 1) * 100:5.1f} %")
            if rate:
                print(f"server CPU per call at {rate} calls/s, against `none` (median of rounds):")
                for mode in ("kill", "risk"):
                    ratio = statistics.median(
                        a / b for a, b in zip(fixed_us[mode], fixed_us["none"], strict=True)
                    )
                    added = statistics.median(
                        a - b for a, b in zip(fixed_us[mode], fixed_us["none"], strict=True)
                    )
                    print(
                        f"  {mode:<5} {ratio:.3f}  -> costs {(ratio - 1) * 100:5.1f} %  ({added:+.0f} us per call)"
                    )
            for channel in channels.values():
                await channel.close(None)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(20)


def main() -> None:
    parser = load_arguments(__doc__, rounds=5)
    parser.add_argument(
        "--rate",
        type=int,
        default=400,
        help="calls/s of the fixed-rate round per mode (default 400; 0: none)",
    )
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--risk-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        eventloop.run(serve(args.serve, args.port, args.db, args.home, args.risk_file))
    else:
        asyncio.run(run(args.concurrency, args.duration, args.rounds, args.rate))


if __name__ == "__main__":
    main()
