"""PlaceOrder over mutual TLS against the same call over plain TCP, in one run, as a ratio.

Three servers, each in its own process (the client in this one), on the same SQLite-backed trading service
(see bench/trading_server.py): plain TCP, mTLS with the same interceptor chain, and the real mesh service
(mTLS + SPIFFE authorisation, called through MeshChannel). Rounds alternate so that drift hits all alike.
All three are UNGUARDED: the trading guard is replaced by a layer naming one fixed principal
(bench/trading_server.py `FixedPrincipal`), so this measures the transport and the mesh, as it did before the guard;
bench/guard.py measures the guard (JWT, signed API keys) against this same unguarded mesh service.
The databases live on tmpfs (/dev/shm) where there is one: the same code path commits, but the disk's fsync
latency, which varied by more than the cost measured here from round to round, is left out (bench/trading_store.py
measures durable commits).
Aim (issue 2): mTLS costs under 5 % of throughput once connections are up.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from bench.loadgen import (
    Result,
    closed_loop,
    free_port,
    load_arguments,
    median_cpu_ratio,
    median_ratio,
    tmpfs,
    until_answered,
)
from bench.mesh import dev_pki, mtls_channel
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc


def start(mode: str, port: int, home: Path) -> subprocess.Popen[bytes]:
    db = f"sqlite:///{home / f'{mode}.db'}"
    cmd = [sys.executable, "-m", "bench.trading_server", "--mode", mode, "--port", str(port), "--db", db]
    return subprocess.Popen([*cmd, "--home", str(home)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def ready(stub: trading_pb2_grpc.TradingServiceAsyncStub) -> None:
    probe = trading_pb2.ListOrdersRequest(account_id="bench")
    await until_answered(lambda: stub.ListOrders(probe, timeout=1), "server", attempts=100)


def caller(stub: trading_pb2_grpc.TradingServiceAsyncStub, tag: str):  # type: ignore[no-untyped-def]
    async def call(i: int) -> object:
        return await stub.PlaceOrder(
            trading_pb2.PlaceOrderRequest(
                account_id="bench",
                client_order_id=f"{tag}-{i}",
                symbol="BTC-USD",
                side=trading_pb2.SIDE_BUY,
                type=trading_pb2.ORDER_TYPE_LIMIT,
                quantity="0.01",
                price="64000.5",
            ),
            timeout=10,
        )

    return call


async def run(concurrency: int, duration: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory(dir=tmpfs()) as tmp:
        home = Path(tmp)
        paths = dev_pki(home, ("trading", "ops"))
        modes = ("plain", "mtls", "mesh")
        ports = {mode: free_port() for mode in modes}
        procs = {mode: start(mode, port, home) for mode, port in ports.items()}
        try:
            ops = tls.Workload.of(paths, "ops")
            channels: dict[str, grpc.aio.Channel] = {
                "plain": grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}"),
                "mtls": mtls_channel(ports["mtls"], "trading", ops),
                "mesh": MeshChannel(f"127.0.0.1:{ports['mesh']}", "trading", ops),
            }
            stubs = {mode: trading_pb2_grpc.TradingServiceStub(channel) for mode, channel in channels.items()}
            for stub in stubs.values():
                await ready(stub)
            results: dict[str, list[Result]] = {mode: [] for mode in modes}
            print(
                f"PlaceOrder, {concurrency} concurrent callers, {duration:.0f} s per round, {rounds} rounds "
                "(every mode unguarded: a fixed principal; bench/guard.py measures the guard)"
            )
            for r in range(rounds):
                for mode in modes[r % 3 :] + modes[: r % 3]:  # rotate the order: drift hits every mode alike
                    res = await closed_loop(
                        caller(stubs[mode], f"{mode}{r}"),
                        concurrency=concurrency,
                        duration=duration,
                        cpu_of=[procs[mode].pid],
                    )
                    results[mode].append(res)
                    print(res.line(f"round {r + 1} {mode}"))
            transport = median_ratio(results["mtls"], results["plain"])
            full = median_ratio(results["mesh"], results["plain"])
            print("\nthroughput against plain TCP (median of rounds):")
            print(
                f"  mTLS transport, same chain:       {transport:.3f}  -> mTLS costs {(1 - transport) * 100:.1f} %"
            )
            print(
                f"  full mesh (mTLS + SPIFFE authz):  {full:.3f}  -> costs {(1 - full) * 100:.1f} %  (no guard)"
            )
            cpu_transport = median_cpu_ratio(results["mtls"], results["plain"])
            cpu_full = median_cpu_ratio(results["mesh"], results["plain"])
            print(
                "CPU per call, client and server, against plain TCP (median of rounds; steadier than throughput):"
            )
            print(
                f"  mTLS transport, same chain:       {cpu_transport:.3f}  -> mTLS costs {(cpu_transport - 1) * 100:.1f} %"
            )
            print(
                f"  full mesh (mTLS + SPIFFE authz):  {cpu_full:.3f}  -> costs {(cpu_full - 1) * 100:.1f} %"
            )
            for channel in channels.values():
                await channel.close(None)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(20)


def main() -> None:
    parser = load_arguments(__doc__, rounds=5)
    args = parser.parse_args()
    asyncio.run(run(args.concurrency, args.duration, args.rounds))


if __name__ == "__main__":
    main()
