"""`tradeguard up`: the suite starts, serves, rotates certificates without a failed call, and stops cleanly."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.support import free_port, openssl_handshake
from tradeguard.cli.up_cmd import COMPONENTS, Supervisor
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc


class Suite:
    def __init__(self, home: Path, *extra: str) -> None:
        self.home = home
        self.env = dict(os.environ, TRADEGUARD_HOME=str(home))
        self.ports = {c.name: free_port() for c in COMPONENTS}
        self.metrics_ports = {c.name: free_port() for c in COMPONENTS}
        for name, port in self.ports.items():
            self.env[f"TRADEGUARD_{name.upper()}_PORT"] = str(port)
            self.env[f"TRADEGUARD_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
        self.log = home.parent / f"up-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tradeguard.cli.main", "up", *extra],
                env=self.env,
                stdout=out,
                stderr=out,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> float:
        start = time.monotonic()
        while text not in self.output():
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() - start < timeout, (
                f"no {text!r} within {timeout}s:\n{self.output()[-3000:]}"
            )
            time.sleep(0.1)
        return time.monotonic() - start

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`tradeguard ARGS…`; the caller asserts on the exit code."""
    cmd = [sys.executable, "-m", "tradeguard.cli.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.slow
def test_up_serves_orders_and_stops_cleanly_then_reuses_its_pki(tmp_path: Path) -> None:
    home = tmp_path / "home"
    suite = Suite(home)
    try:
        elapsed = suite.wait_for("Tradeguard is up", 30)
        assert elapsed < 30
        assert "created a dev PKI" in suite.output()
        for port in suite.ports.values():  # every port of the suite refuses TLS 1.2, accepts TLS 1.3
            paths = pki.PkiPaths(home)
            assert "Protocol version" not in openssl_handshake(port, paths, "ops", "tls1_2")
            assert "Protocol version: TLSv1.3" in openssl_handshake(port, paths, "ops", "tls1_3")
        placed = cli(
            suite.env,
            *("orders", "place", "--account", "acct-1", "--client-order-id", "demo-1", "--symbol", "BTC-USD"),
            *("--side", "buy", "--quantity", "0.5", "--price", "64000.25"),
        )
        assert placed.returncode == 0, placed.stderr
        assert '"status": "ORDER_STATUS_OPEN"' in placed.stdout
        metrics_url = f"http://127.0.0.1:{suite.metrics_ports['trading']}/metrics"
        metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert 'method="/tradeguard.trading.v1.TradingService/PlaceOrder"' in metrics
        # the key vault came up unsealed on the dev passphrase and serves its policy
        assert cli(suite.env, "vault", "create-key", "credentials").returncode == 0
        assert cli(suite.env, "pki", "issue", "auth").returncode == 0
        sealed = subprocess.run(
            [sys.executable, "-m", "tradeguard.cli.main", "vault", "--as", "auth", "encrypt", "credentials"],
            env=suite.env,
            input="s3cret-value",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        ciphertext = sealed.stdout.strip()
        assert ciphertext.startswith("tgv1:credentials:v1:") and "s3cret" not in ciphertext
        opened = cli(suite.env, "vault", "--as", "auth", "decrypt", "credentials", ciphertext)
        assert opened.stdout == "s3cret-value"
        denied = cli(suite.env, "vault", "--as", "trading", "decrypt", "credentials", ciphertext)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    finally:
        assert suite.stop() == 0
    assert "all services stopped" in suite.output()
    assert oct(os.stat(pki.PkiPaths(home).root_key).st_mode & 0o777) == "0o600"

    again = Suite(home)
    try:
        again.wait_for("Tradeguard is up", 30)
        assert "created a dev PKI" not in again.output()
        listed = cli(again.env, "orders", "list", "--account", "acct-1")
        assert "demo-1" in listed.stdout  # the data survived the restart
    finally:
        assert again.stop() == 0


@pytest.mark.slow
async def test_running_suite_renews_certificates_with_no_failed_call(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # 4-second certificates, checked every 0.25 s: renewed at half-life, about every 2 s
    suite = Suite(home, "--cert-hours", str(4 / 3600), "--check-seconds", "0.25")
    try:
        await asyncio.to_thread(suite.wait_for, "Tradeguard is up", 30)
        paths = pki.PkiPaths(home)
        first = paths.cert("trading").read_bytes()
        ops = tls.Workload.of(paths, "ops")
        calls = 0
        async with MeshChannel(f"127.0.0.1:{suite.ports['trading']}", "trading", ops) as channel:
            stub = trading_pb2_grpc.TradingServiceStub(channel)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                calls += 1
                await stub.ListOrders(trading_pb2.ListOrdersRequest(account_id="acct-1"), timeout=5)
                await asyncio.sleep(0.01)
            assert channel.generation >= 1  # the client followed its own certificate's rotation
        assert calls > 50
        assert paths.cert("trading").read_bytes() != first
        assert "renewed certificates" in suite.output()
    finally:
        assert suite.stop() == 0


def test_supervisor_rotates_a_due_intermediate_then_renews_every_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = pki.PkiPaths(tmp_path)
    pki.init_ca(paths, now=datetime.now(UTC) - timedelta(days=250))  # 250 of 365 days gone: due
    old = paths.intermediate_cert.read_bytes()
    supervisor = Supervisor(
        argparse.Namespace(home=tmp_path, cert_hours=24.0, check_seconds=1.0, ready_timeout=30.0)
    )
    supervisor.prepare_pki()
    assert "rotated the intermediate CA" in capsys.readouterr().out
    assert paths.intermediate_cert.read_bytes() != old and not pki.intermediate_due(paths)
    for name in [c.name for c in supervisor.components] + ["ops"]:
        assert x509.load_pem_x509_certificates(paths.cert(name).read_bytes())[
            1
        ] == x509.load_pem_x509_certificate(paths.intermediate_cert.read_bytes())
    supervisor.prepare_pki()  # nothing due any more: nothing rotated
    assert "rotated" not in capsys.readouterr().out
