"""`tradeguard up`: the whole suite as separate processes on a dev PKI, with certificate rotation.

The supervisor makes the PKI on first run (and reuses it after), issues each workload's certificate,
starts every service, waits until each answers its health check over mutual TLS, prints how to call
them, renews certificates at half their lifetime while running (the servers pick the new files up
without restarting), and on Ctrl-C or SIGTERM stops every service gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tradeguard.mesh import pki, tls


@dataclass(frozen=True)
class Component:
    name: str
    module: str
    port: int


# Start order: what others depend on first. Services not built yet are skipped.
COMPONENTS = (
    Component("keyvault", "services.keyvault", 50054),
    Component("trading", "services.trading", 50055),
)
OPERATOR = "ops"


def metrics_port(component: Component, port: int) -> int:
    """Prometheus on loopback: TRADEGUARD_<NAME>_METRICS_PORT, by default the service port + 1000."""
    raw = os.environ.get(f"TRADEGUARD_{component.name.upper()}_METRICS_PORT")
    return int(raw) if raw else port + 1000


def available(components: tuple[Component, ...] = COMPONENTS) -> list[Component]:
    return [c for c in components if importlib.util.find_spec(f"{c.module}.__main__") is not None]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = subparsers.add_parser("up", help="start the whole suite on embedded defaults")
    up.add_argument(
        "--cert-hours", type=float, default=24.0, help="workload certificate lifetime (default 24)"
    )
    up.add_argument("--check-seconds", type=float, default=30.0, help="how often to look for due renewals")
    up.add_argument("--ready-timeout", type=float, default=30.0)
    up.set_defaults(func=lambda args: asyncio.run(Supervisor(args).run()))


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.home: Path = args.home
        self.paths = pki.PkiPaths(self.home)
        self.lifetime = timedelta(hours=args.cert_hours)
        self.check_seconds: float = args.check_seconds
        self.ready_timeout: float = args.ready_timeout
        self.components = available()
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def ports(self) -> dict[str, int]:
        out = {}
        for c in self.components:
            raw = os.environ.get(f"TRADEGUARD_{c.name.upper()}_PORT")
            out[c.name] = int(raw) if raw else c.port
        return out

    def prepare_pki(self) -> None:
        if pki.init_ca(self.paths):
            print(f"created a dev PKI in {self.paths.dir}")
        self.rotate_intermediate_if_due()
        names = [c.name for c in self.components] + [OPERATOR]
        renewed = pki.renew_due(self.paths, names, lifetime=self.lifetime)
        if renewed:
            print(f"issued certificates for: {', '.join(renewed)}")

    def rotate_intermediate_if_due(self) -> None:
        """The dev PKI keeps its root key, so the supervisor replaces the intermediate CA itself once half
        its life is gone; the workload certificates are then all due and renewed right after."""
        if pki.intermediate_due(self.paths):
            expiry = pki.rotate_intermediate(self.paths)
            print(f"rotated the intermediate CA (new one valid until {expiry:%Y-%m-%d}Z)", flush=True)

    def start(self, component: Component, port: int) -> None:
        env = dict(os.environ)
        env["TRADEGUARD_HOME"] = str(self.home)
        env[f"TRADEGUARD_{component.name.upper()}_PORT"] = str(port)
        env.setdefault(
            f"TRADEGUARD_{component.name.upper()}_METRICS_PORT", str(metrics_port(component, port))
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        operator_set = ("TRADEGUARD_VAULT_PASSPHRASE", "TRADEGUARD_VAULT_PASSPHRASE_FILE")
        if component.name == "keyvault" and not any(env.get(name) for name in operator_set):
            # a file the vault reads once, not the environment (which /proc/<pid>/environ keeps showing)
            env["TRADEGUARD_VAULT_PASSPHRASE_FILE"] = str(self.dev_vault_passphrase_file())
        self.children[component.name] = subprocess.Popen([sys.executable, "-m", component.module], env=env)

    def dev_vault_passphrase_file(self) -> Path:
        """The embedded default's sealing passphrase: made once, kept 0600 beside the data. In production the
        passphrase comes from the operator (TRADEGUARD_VAULT_PASSPHRASE_FILE or `tradeguard vault unseal`)."""
        path = self.home / "data" / "dev-vault-passphrase"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        return path

    async def wait_ready(self, name: str, port: int) -> None:
        workload = tls.Workload.of(self.paths, OPERATOR)
        options = [("grpc.ssl_target_name_override", name)]
        deadline = asyncio.get_running_loop().time() + self.ready_timeout
        while True:
            child = self.children[name]
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited with code {child.returncode} during start-up")
            try:
                async with grpc.aio.secure_channel(
                    f"127.0.0.1:{port}", tls.channel_credentials(workload), options=options
                ) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{name} was not ready within {self.ready_timeout:.0f}s")
            await asyncio.sleep(0.2)

    def stop_all(self, timeout: float = 15.0) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in self.children.items():
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {timeout:.0f}s; killing it", file=sys.stderr)
                child.kill()
                child.wait()

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.prepare_pki()
        ports = self.ports()
        try:
            for component in self.components:
                self.start(component, ports[component.name])
                await self.wait_ready(component.name, ports[component.name])
            self.banner(ports)
            return await self.supervise(stop)
        except RuntimeError as error:
            print(f"tradeguard up: {error}", file=sys.stderr)
            return 1
        finally:
            self.stop_all()
            print("all services stopped")

    async def supervise(self, stop: asyncio.Event) -> int:
        names = [c.name for c in self.components] + [OPERATOR]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.check_seconds)
            self.rotate_intermediate_if_due()
            renewed = pki.renew_due(self.paths, names, lifetime=self.lifetime)
            if renewed:
                print(f"renewed certificates: {', '.join(renewed)}", flush=True)
            for name, child in self.children.items():
                if child.poll() is not None:
                    print(f"{name} exited with code {child.returncode}; stopping the suite", file=sys.stderr)
                    return 1
        return 0

    def banner(self, ports: dict[str, int]) -> None:
        d = self.paths
        lines = ["", "Tradeguard is up (Ctrl-C stops it):"]
        lines += [
            f"  {c.name:<9} 127.0.0.1:{ports[c.name]}   metrics http://127.0.0.1:{metrics_port(c, ports[c.name])}/metrics"
            for c in self.components
        ]
        lines += [
            "",
            "Place an order with the CLI (it uses the ops certificate):",
            "  .venv/bin/tradeguard orders place --account acct-1 --client-order-id demo-1 \\",
            "      --symbol BTC-USD --side buy --type limit --quantity 0.5 --price 64000.25",
            "",
            "The key vault (administration as ops, key use as a service the policy allows, e.g. auth):",
            "  .venv/bin/tradeguard vault status",
            "  .venv/bin/tradeguard vault create-key credentials",
            "  .venv/bin/tradeguard pki issue auth     # a certificate to act as the auth service",
            "  printf 's3cret' | .venv/bin/tradeguard vault --as auth encrypt credentials --context user-1",
            "",
            "Or with grpcurl:",
            f"  grpcurl -cacert {d.ca_bundle} -cert {d.cert(OPERATOR)} -key {d.key(OPERATOR)} \\",
            f"      -authority trading 127.0.0.1:{ports.get('trading', 50055)} list",
            "",
        ]
        print("\n".join(lines), flush=True)
