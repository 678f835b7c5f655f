"""The kit's per-call server chain against a bare grpc.aio echo over mutual TLS, in one run.

Six echo servers (tradeguard.echo.v1 `Echo`, unary), each in its own process, same options, same TLS
credentials, the client in this process on one mTLS channel per server:

  bare       no interceptor at all (grpc deserialises the request)
  full       the kit's chain as MeshServer mounts it (on each handler at registration, no grpc interceptor):
             telemetry → authorisation → error mapping → decoding (one JSON log line per RPC, written to a
             file on tmpfs; counted at the end)
  telemetry  TelemetryInterceptor alone (request id, log line, metrics)
  authz      AuthzInterceptor alone (SPIFFE ID in the method's allow-list)
  errors     ErrorInterceptor alone (exception → rich status)
  decode     the chain with no wrapping layer: raw bytes in, decoded (and enum-checked) after the interceptor

Each round measures every mode twice: saturated (closed loop, `--concurrency` callers: throughput and CPU per
call) and at a fixed arrival rate (open loop, `--rate` calls/s: the server's CPU per call under the same load
for every mode, so that what a layer adds is not mixed with how a saturated server batches its work).
Rounds rotate the order so that drift hits every mode alike. Printed: each round, then the median ratio of
each mode's throughput to the bare echo's, and the CPU per call (server alone, and client + server, from
/proc) that each mode adds to the bare echo's (the client's share is the same in every mode and cancels out).
On a machine shared with other work the saturated figures move by tens of percent between rounds; the
fixed-rate CPU per call is the steadier figure per layer.
Aim (issue 6): `full`, still writing one log line per RPC, keeps 0.85 or more of the bare throughput.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from bench.loadgen import (
    Result,
    closed_loop,
    fixed_rate_server_cpu,
    free_port,
    load_arguments,
    median_ratio,
    process_cpu_s,
    tmpfs,
    until_answered,
)
from bench.mesh import dev_pki, mtls_channel
from tradeguard import eventloop
from tradeguard.echo import ECHO, ECHO_RULES, EchoServicer
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.mesh import pki, tls
from tradeguard.mesh.authz import AuthzInterceptor, MethodPolicy
from tradeguard.mesh.server import HANDSHAKE_TIMEOUT_S, chain, mount
from tradeguard.observability.interceptor import TelemetryInterceptor
from tradeguard.observability.logging import configure_logging
from tradeguard.observability.metrics import RpcMetrics
from tradeguard.rpc.handlers import ChainInterceptor
from tradeguard.rpc.interceptor import ErrorInterceptor

MODES = ("bare", "full", "telemetry", "authz", "errors", "decode")
NAME = "echo"


def _interceptors(mode: str, trust_domain: str) -> list[Any]:
    metrics = RpcMetrics(NAME, registry=CollectorRegistry())
    policy = MethodPolicy(trust_domain, ECHO_RULES)
    if mode == "bare":
        return []
    if mode == "full":
        return []  # mounted at registration: see serve
    if mode == "telemetry":
        return [TelemetryInterceptor(NAME, metrics)]
    if mode == "authz":
        return [AuthzInterceptor(policy)]
    if mode == "errors":
        return [ErrorInterceptor()]
    if mode == "decode":
        return [ChainInterceptor([])]
    raise ValueError(mode)


async def serve(mode: str, port: int, home: Path, log_path: Path) -> None:
    paths = pki.PkiPaths(home)
    with log_path.open("a", encoding="utf-8") as log:
        configure_logging(json=True, stream=log, level="info")
        server = grpc.aio.server(
            interceptors=_interceptors(mode, pki.trust_domain(paths)),
            options=[
                ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        target = server
        if mode == "full":
            metrics = RpcMetrics(NAME, registry=CollectorRegistry())
            target = mount(server, chain(NAME, metrics, MethodPolicy(pki.trust_domain(paths), ECHO_RULES)))
        echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), target)
        creds, _reloader = tls.server_credentials(tls.Workload.of(paths, NAME))
        server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        await server.wait_for_termination()


def start(mode: str, port: int, home: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.kit_chain", "--serve", mode, "--port", str(port), "--home", str(home)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def ready(stub: echo_pb2_grpc.EchoServiceAsyncStub) -> None:
    await until_answered(lambda: stub.Echo(echo_pb2.EchoRequest(text="ready"), timeout=1), "server")


async def run(
    concurrency: int, duration: float, rounds: int, rate: int, pin: bool, modes: tuple[str, ...]
) -> None:
    with tempfile.TemporaryDirectory(dir=tmpfs()) as tmp:
        home = Path(tmp)
        paths = dev_pki(home, (NAME, "ops"))
        ports = {mode: free_port() for mode in modes}
        procs = {mode: start(mode, port, home) for mode, port in ports.items()}
        try:
            ops = tls.Workload.of(paths, "ops")
            channels = {mode: mtls_channel(port, NAME, ops) for mode, port in ports.items()}
            stubs = {mode: echo_pb2_grpc.EchoServiceStub(channel) for mode, channel in channels.items()}
            for stub in stubs.values():
                await ready(stub)
            if pin:  # the load generator on one core, the servers (one loaded at a time) on the other
                _pin(os.getpid(), 0)
                for proc in procs.values():
                    _pin(proc.pid, 1)
            request = echo_pb2.EchoRequest(text="hello", tone=echo_pb2.TONE_PLAIN)
            results: dict[str, list[Result]] = {mode: [] for mode in modes}
            server_us: dict[str, list[float]] = {mode: [] for mode in modes}  # the server process's CPU alone
            fixed_us: dict[str, list[float]] = {
                mode: [] for mode in modes
            }  # the same at a fixed arrival rate
            print(
                f"{ECHO}/Echo over mTLS, {concurrency} concurrent callers, {duration:.0f} s per round, "
                f"{rounds} rounds, one server process per mode ({os.cpu_count()} CPUs)"
            )
            for r in range(rounds):
                shift = r % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    stub = stubs[mode]

                    async def call(i: int, stub: echo_pb2_grpc.EchoServiceAsyncStub = stub) -> object:
                        return await stub.Echo(request, timeout=10)

                    pid = procs[mode].pid
                    await closed_loop(call, concurrency=concurrency, duration=0.5, warmup=0)  # warm up
                    server_before = process_cpu_s(pid)
                    res = await closed_loop(
                        call, concurrency=concurrency, duration=duration, warmup=0, cpu_of=[pid]
                    )
                    server_us[mode].append((process_cpu_s(pid) - server_before) / max(1, res.calls) * 1e6)
                    results[mode].append(res)
                    fixed_us[mode].append(
                        await fixed_rate_server_cpu(
                            call, pid, rate, min(duration, 2.0), return_exceptions=True
                        )
                    )
                    print(
                        res.line(f"round {r + 1} {mode}")
                        + f"   server {server_us[mode][-1]:4.0f} us/call, {fixed_us[mode][-1]:4.0f} at {rate}/s"
                    )
            print("\nagainst the bare echo (median of rounds):")
            print(
                f"  {'mode':<10} {'throughput':>10}   {'CPU/call added: server':>22}   {'client+server':>13}"
                f"   {f'server at {rate}/s':>17}"
            )
            bare = results["bare"]
            for mode in modes[1:]:
                ratio = median_ratio(results[mode], bare)
                added = statistics.median(
                    (a.cpu_us_per_call or 0.0) - (b.cpu_us_per_call or 0.0)
                    for a, b in zip(results[mode], bare, strict=True)
                )
                server = statistics.median(
                    a - b for a, b in zip(server_us[mode], server_us["bare"], strict=True)
                )
                fixed = statistics.median(
                    a - b for a, b in zip(fixed_us[mode], fixed_us["bare"], strict=True)
                )
                print(
                    f"  {mode:<10} {ratio:10.3f}   {server:+19.1f} us   {added:+10.1f} us   {fixed:+14.1f} us"
                )
            bare_cpu = statistics.median(b.cpu_us_per_call or 0.0 for b in bare)
            print(
                f"  (bare echo: {statistics.median(server_us['bare']):.0f} us of server CPU per call, "
                f"{bare_cpu:.0f} us with the client's; {statistics.median(fixed_us['bare']):.0f} us at {rate}/s)"
            )
            for channel in channels.values():
                await channel.close(None)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(20)
        if "full" in modes:
            lines = _count_rpc_lines(home / "full.log")
            calls = sum(res.calls + res.errors for res in results["full"])
            print(
                f"full chain: {lines} rpc log lines written for at least {calls} measured calls (+ warm-up)"
            )


def _pin(pid: int, cpu: int) -> None:
    """Every thread of process `pid` (and so every thread it starts later) on CPU `cpu`."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def _count_rpc_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if '"event": "rpc"' in line)


def _modes(text: str) -> tuple[str, ...]:
    chosen = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = sorted(set(chosen) - set(MODES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}"
        )
    return ("bare", *dict.fromkeys(mode for mode in chosen if mode != "bare"))


def main() -> None:
    parser = load_arguments(__doc__, rounds=3)
    parser.set_defaults(concurrency=64)
    parser.add_argument(
        "--rate", type=int, default=1000, help="calls/s of the fixed-rate CPU measurement (default 1000)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the client on CPU 0, the servers on CPU 1 (saturated: each server bound by its own CPU per call)",
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default=MODES,
        help=f"comma-separated modes to compare, bare always first (default {','.join(MODES)})",
    )
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        eventloop.run(serve(args.serve, args.port, args.home, args.home / f"{args.serve}.log"))
    else:
        asyncio.run(run(args.concurrency, args.duration, args.rounds, args.rate, args.pin, args.modes))


if __name__ == "__main__":
    main()
