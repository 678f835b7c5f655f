"""`tradeguard up`: the suite starts on its own ports, prints commands that work as printed (a trader, an API key
saved 0600 and a SIGNED order), refuses ports that are taken, restarts a killed service, renews certificates (also
before it waits for health) with no failed call, and stops cleanly. Every suite runs on free ports in its own home
and is stopped even when a test fails. Every order call carries a person's credentials (the trading service's
guard): an API key created the way the banner prints it, then `--key-id "$TG_KEY"` (or its signed headers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from argparse import Namespace
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from stat import S_IMODE
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import TEST_LIMITS, free_port, openssl_handshake
from tests.support_auth import printed_commands
from tradeguard import registry, signing
from tradeguard.cli import common, credentials, main
from tradeguard.cli.up_cmd import (
    WORKLOADS,
    Backoff,
    Child,
    GaveUp,
    NotReady,
    Supervisor,
    available,
    listens_on,
)
from tradeguard.guard.client import ApiKeyCredentials
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.risk.config import parse_risk
from tradeguard.testing import eventually
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]
UP_WITHIN_S = 180.0  # generous: a busy 2-core machine starting every service


def _clean_env() -> dict[str, str]:
    """The environment without any TRADEGUARD_* setting, and with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Suite:
    """`tradeguard up` as a process on free ports in `home`; its combined output in a file."""

    def __init__(self, home: Path, *extra: str, ports: dict[str, int] | None = None) -> None:
        self.home = home
        self.services = [entry.name for entry in available()]
        self.ports = ports or {name: free_port() for name in self.services}
        self.metrics_ports = {name: free_port() for name in self.services}
        self.env = _clean_env()
        self.env["TRADEGUARD_HOME"] = str(home)
        for name in self.services:
            self.env[f"{registry.env_prefix(name)}_PORT"] = str(self.ports[name])
            self.env[f"{registry.env_prefix(name)}_METRICS_PORT"] = str(self.metrics_ports[name])
        home.parent.mkdir(parents=True, exist_ok=True)
        self.log = home.parent / f"up-{home.name}-{len(list(home.parent.glob('up-*')))}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tradeguard.cli.main", "up", *extra],
                env=self.env,
                stdout=out,
                stderr=out,
                cwd=ROOT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The supervisor's structured log lines named `event` (with these field values)."""
        out = []
        for line in self.output().splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                    out.append(record)
        return out

    def pid(self, service: str) -> int:
        return int(self.events("service started", service=service)[-1]["pid"])

    async def wait_for(self, text: str, within_s: float = UP_WITHIN_S) -> None:
        await eventually(lambda: text in self.output() or self.proc.poll() is not None, within_s)
        assert text in self.output(), self.output()[-4000:]

    async def wait_for_banner(self) -> None:
        """Until the whole banner is written (it ends with the trading service's grpcurl line): the file is read
        while the supervisor writes it, and a long banner takes more than one write."""
        await self.wait_for("Tradeguard is up")
        await self.wait_for(f":{self.ports['trading']} list\n")

    def stop(self) -> int:
        """SIGTERM and wait; on a hang, kill the supervisor and every service it started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            for record in self.events("service started"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(record["pid"]), signal.SIGKILL)
            self.proc.wait()
            raise


@contextlib.contextmanager
def running(home: Path, *extra: str, ports: dict[str, int] | None = None) -> Iterator[Suite]:
    suite = Suite(home, *extra, ports=ports)
    try:
        yield suite
    finally:
        code = suite.stop()
    assert code == 0, suite.output()[-4000:]
    assert "all services stopped" in suite.output()


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`tradeguard ARGS…`; the caller asserts on the exit code."""
    cmd = [sys.executable, "-m", "tradeguard.cli.main", *args]
    return subprocess.run(
        cmd, env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def trader_key(suite: Suite, username: str, account: str = "acct-1") -> str:
    """A trader in `account` and an HMAC API key for them (orders:read, orders:write), created as the banner
    prints it (`auth user create … --password-file F --quiet`, `auth key create "$TG_USER" … --save --quiet`):
    the key id; its secret is in $TRADEGUARD_HOME/credentials/KEY_ID.secret (0600), where `orders` finds it."""
    password = suite.home / f"{username}.password"
    password.write_text("a long and private passphrase\n")
    password.chmod(0o600)
    user = cli(
        suite.env,
        *("auth", "user", "create", username, "--account", account, "--role", "trader"),
        *("--password-file", str(password), "--quiet"),
    )
    assert user.returncode == 0, user.stderr
    key = cli(
        suite.env,
        *("auth", "key", "create", user.stdout.strip(), "--scope", "orders:read", "--scope", "orders:write"),
        *("--ip", "127.0.0.1/32", "--save", "--quiet"),
    )
    assert key.returncode == 0, key.stderr
    key_id = key.stdout.strip()
    assert signing.key_id_valid(key_id), key.stdout
    return key_id


async def health(paths: pki.PkiPaths, name: str, port: int) -> bool:
    credentials = tls.channel_credentials(tls.Workload.of(paths, "ops"))
    options = [("grpc.ssl_target_name_override", name)]
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.slow
async def test_up_prints_commands_that_work_as_printed_refuses_a_second_suite_and_reuses_its_pki(
    tmp_path: Path,
) -> None:
    """Newcomers 1, 2, 3 and 6: on ports other than the defaults, in a home other than ./.tradeguard, the
    commands `up` prints run as printed in a fresh shell (the README's `vault --as auth encrypt` included:
    `up` issued auth's certificate), `vault status` shows `sealed: false`; a second `up` on the same ports
    refuses before starting anything and never says it is up."""
    home = tmp_path / "home"
    with running(home) as suite:
        await suite.wait_for_banner()
        assert "created a dev PKI" in suite.output()
        banner = suite.output().split("Tradeguard is up", 1)[1]
        for name in suite.services:
            assert f"127.0.0.1:{suite.ports[name]}" in banner
        commands = printed_commands(banner)
        assert commands[0].split()[0] == "export"
        assert f"TRADEGUARD_HOME={home}" in commands[0]
        assert f"TRADEGUARD_TRADING_PORT={suite.ports['trading']}" in commands[0]
        assert any("vault --as auth encrypt credentials" in c for c in commands)
        assert not any("pki issue" in c for c in commands)  # nothing left to issue by hand
        assert any(c.startswith("export TG_KEY=") and "--save --quiet" in c for c in commands)
        assert any("orders place" in c and '--key-id "$TG_KEY"' in c for c in commands)  # a SIGNED order
        script = "set -e\n" + "".join(f"echo '>>> {c.replace(chr(39), '')}'\n{c}\n" for c in commands)
        script += (
            'printf "TG_KEY=%s\\n" "$TG_KEY"\n'  # the key the printed commands created, for what follows
        )
        (ROOT / ".venv" / "bin" / "tradeguard").stat()  # the printed path exists in this checkout
        shell = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", script],
            env=_clean_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert shell.returncode == 0, shell.stdout + shell.stderr
        assert '"status": "ORDER_STATUS_OPEN"' in shell.stdout
        key_lines = re.findall(r"^TG_KEY=(\S+)$", shell.stdout, re.MULTILINE)
        assert len(key_lines) == 1 and signing.key_id_valid(key_lines[0]), shell.stdout
        key_id = key_lines[0]
        secret = credentials.secret_path(home, key_id)
        assert oct(secret.stat().st_mode & 0o777) == "0o600"
        assert secret.read_text().strip() not in shell.stdout + shell.stderr  # saved, shown nowhere
        assert '"sealed": false' in shell.stdout
        assert re.search(r"^tgv1:credentials:v1:\S+$", shell.stdout, re.MULTILINE), shell.stdout
        paths = pki.PkiPaths(home)
        assert (
            f"grpcurl -cacert {paths.ca_bundle} -cert {paths.cert('ops')} -key {paths.key('ops')}" in banner
        )
        assert f"-authority trading 127.0.0.1:{suite.ports['trading']} list" in banner
        for name in suite.services:  # every port refuses TLS 1.2 and accepts TLS 1.3
            assert "Protocol version" not in openssl_handshake(suite.ports[name], paths, "ops", "tls1_2")
            assert "Protocol version: TLSv1.3" in openssl_handshake(suite.ports[name], paths, "ops", "tls1_3")
        metrics_url = f"http://127.0.0.1:{suite.metrics_ports['trading']}/metrics"
        assert metrics_url in banner
        with await asyncio.to_thread(urllib.request.urlopen, metrics_url, timeout=30) as response:
            metrics = response.read().decode()
        assert 'method="/tradeguard.trading.v1.TradingService/PlaceOrder"' in metrics

        ciphertext = cli(
            suite.env, "vault", "encrypt", "credentials", "--as", "auth", stdin="v"
        ).stdout.strip()
        assert ciphertext.startswith("tgv1:credentials:v1:")
        opened = cli(suite.env, "vault", "decrypt", "credentials", ciphertext, "--as", "auth")
        assert opened.returncode == 0 and opened.stdout == "v"
        denied = cli(suite.env, "vault", "--as", "trading", "decrypt", "credentials", ciphertext)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr

        # a second suite on the same ports (another home): refused before it starts anything
        second = cli(dict(suite.env, TRADEGUARD_HOME=str(tmp_path / "other")), "up")
        first = suite.services[0]
        assert second.returncode == 2, second.stdout + second.stderr
        assert "Tradeguard is up" not in second.stdout and "service started" not in second.stderr
        assert f"port {suite.ports[first]} on 127.0.0.1 ({first}) is already in use" in second.stderr
        assert f"set {registry.env_prefix(first)}_PORT to a free port" in second.stderr
        listed = cli(suite.env, "orders", "list", "--account", "acct-1", "--key-id", key_id)
        assert listed.returncode == 0, listed.stderr  # the first suite still serves
        assert "demo-1" in listed.stdout
    assert oct(os.stat(pki.PkiPaths(home).root_key).st_mode & 0o777) == "0o600"

    with running(home, ports=suite.ports) as again:
        await again.wait_for_banner()
        assert "created a dev PKI" not in again.output()
        listed = cli(again.env, "orders", "list", "--account", "acct-1", "--key-id", key_id)
        # the user and the key survived the restart (auth's data), and so did the order
        assert listed.returncode == 0, listed.stderr
        assert "demo-1" in listed.stdout


@pytest.mark.slow
async def test_a_killed_service_is_restarted_at_once_and_the_suite_stays_up(tmp_path: Path) -> None:
    """Probing 6: `kill -9` of one service stopped the whole suite at the next 30 s poll."""
    home = tmp_path / "home"
    with running(home) as suite:
        await suite.wait_for_banner()
        victim = "trading" if "trading" in suite.services else suite.services[-1]
        key_id = trader_key(suite, "kim") if victim == "trading" else ""
        others = {name: suite.pid(name) for name in suite.services if name != victim}
        old = suite.pid(victim)
        os.kill(old, signal.SIGKILL)
        await eventually(lambda: bool(suite.events("service restarted", service=victim)), UP_WITHIN_S)
        exited = suite.events("service exited; restarting", service=victim)
        assert exited[0]["pid"] == old and exited[0]["code"] == -signal.SIGKILL
        assert exited[0]["restart_in_s"] > 0 and exited[0]["crashes_in_a_row"] == 1
        new = suite.pid(victim)
        assert new != old and suite.events("service restarted", service=victim)[0]["pid"] == new
        assert suite.proc.poll() is None  # the suite is still up
        assert await health(pki.PkiPaths(home), victim, suite.ports[victim])
        assert {name: suite.pid(name) for name in others} == others  # nothing else was restarted
        if victim == "trading":
            placed = cli(
                suite.env,
                *("orders", "place", "--account", "acct-1", "--client-order-id", "after-kill"),
                # a symbol the packaged risk limits price (BTC-USD 64000): an unpriced one is refused, fail closed
                *("--symbol", "BTC-USD", "--side", "buy", "--quantity", "1", "--price", "64000"),
                *("--key-id", key_id),
            )
            assert placed.returncode == 0, placed.stderr  # the restarted trading service's guard reaches auth
            assert '"client_order_id": "after-kill"' in placed.stdout


def _leaf(path: Path) -> bytes:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].public_bytes(serialization.Encoding.DER)


def _served_leaf(paths: pki.PkiPaths, name: str, port: int) -> bytes:
    """The certificate the server presents in a TLS 1.3 handshake now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(paths.ca_bundle)
    context.load_cert_chain(paths.cert("ops"), paths.key("ops"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.slow
async def test_running_suite_renews_due_certificates_with_no_failed_call(tmp_path: Path) -> None:
    """Newcomer 8: the old test issued 4-second certificates that expired before a busy machine had the suite
    up. Here the certificates last 24 h; once the suite is up the test makes two of them due (re-issued as if
    13 h old) and waits for the renewal itself, calling all along."""
    home = tmp_path / "home"
    # the caller below calls back to back: the tests' generous limits, not the packaged ones (`up` never
    # overwrites a limits file it finds)
    limits = home / "config" / "limits.yaml"
    limits.parent.mkdir(parents=True, mode=0o700)
    limits.write_text(TEST_LIMITS)
    with running(home, "--check-seconds", "0.2") as suite:
        await suite.wait_for_banner()
        paths = pki.PkiPaths(home)
        port = suite.ports["trading"]
        key_id = trader_key(suite, "rene")
        key = ApiKeyCredentials(
            key_id, secret=credentials.read_secret_file(str(credentials.secret_path(home, key_id)))
        )
        method = "/tradeguard.trading.v1.TradingService/ListOrders"
        request = trading_pb2.ListOrdersRequest(account_id="acct-1")
        calls, failures = 0, []
        done = asyncio.Event()
        async with MeshChannel(f"127.0.0.1:{port}", "trading", tls.Workload.of(paths, "ops")) as channel:
            stub = trading_pb2_grpc.TradingServiceStub(channel)

            async def call_all_along() -> None:
                nonlocal calls
                while not done.is_set():
                    signed = key.headers(  # signed per call: fresh timestamp and nonce, as the guard requires
                        time.time_ns() // 1_000_000,
                        signing.new_nonce(os.urandom),
                        method,
                        request.SerializeToString(),
                    )
                    try:
                        await stub.ListOrders(request, timeout=30, metadata=signed)
                    except grpc.aio.AioRpcError as error:
                        failures.append(error)
                    calls += 1

            caller = asyncio.create_task(call_all_along())
            try:
                await eventually(lambda: calls >= 5, UP_WITHIN_S)
                backdated = datetime.now(UTC) - timedelta(hours=13)
                for name in ("trading", "ops"):
                    pki.issue(paths, name, now=backdated)
                    assert pki.renewal_reason(paths, name) == "past half its lifetime"
                aged = {name: _leaf(paths.cert(name)) for name in ("trading", "ops")}
                await eventually(
                    lambda: all(
                        _leaf(paths.cert(name)) != aged[name] and not pki.needs_renewal(paths, name)
                        for name in aged
                    ),
                    UP_WITHIN_S,
                )
                renewed = await asyncio.to_thread(_served_leaf, paths, "trading", port)
                assert renewed == _leaf(paths.cert("trading"))  # the server presents the renewed certificate
                await eventually(lambda: channel.generation >= 1, UP_WITHIN_S)  # the client followed its own
                after = calls
                await eventually(lambda: calls >= after + 20, UP_WITHIN_S)
            finally:
                done.set()
                await caller
        assert failures == []
        assert any({"trading", "ops"} <= set(e["workloads"]) for e in suite.events("certificates renewed"))


# --- the supervisor in process ---------------------------------------------------------------------------------


def _supervisor(home: Path, *extra: str, services: list[str] | None = None) -> Supervisor:
    args = main.parser().parse_args(["up", *extra])
    args.home = home
    chosen = None if services is None else [registry.lookup(name) for name in services]
    return Supervisor(args, chosen)


@pytest.fixture
def service_ports(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Free ports for every registered service, in this process's environment (where `plan` reads them)."""
    ports = {}
    for name in registry.SERVICES:
        ports[name] = free_port()
        monkeypatch.setenv(f"{registry.env_prefix(name)}_PORT", str(ports[name]))
        monkeypatch.setenv(f"{registry.env_prefix(name)}_METRICS_PORT", str(free_port()))
    monkeypatch.delenv("TRADEGUARD_HOST", raising=False)
    return ports


@contextlib.asynccontextmanager
async def stopped_after(supervisor: Supervisor) -> AsyncIterator[Supervisor]:
    try:
        yield supervisor
    finally:
        await supervisor.stop_all(grace_s=30)


async def test_supervisor_renews_an_expired_certificate_before_it_waits_for_health(
    tmp_path: Path, service_ports: dict[str, int]
) -> None:
    """Newcomer 8: certificates that expire between `prepare_pki` and the health check (a slow start) are
    renewed before the check, not waited on until the start-up times out."""
    supervisor = _supervisor(tmp_path, "--ready-timeout", "120", services=["trading"])
    supervisor.prepare_pki()
    paths = supervisor.paths
    for name in ("ops", "trading"):
        pki.issue(paths, name, now=datetime.now(UTC) - timedelta(days=2), lifetime=timedelta(hours=1))
        assert pki.renewal_reason(paths, name) == "expired"
    async with stopped_after(supervisor):
        (child,) = supervisor.plan()
        supervisor.children[child.name] = child
        await supervisor.spawn(child)
        await supervisor.wait_ready(child)
        assert child.ready and child.alive()
    assert not pki.needs_renewal(paths, "ops") and not pki.needs_renewal(paths, "trading")


async def test_a_health_answer_from_another_process_is_not_taken_for_the_childs(
    trading: Any, tmp_path: Path
) -> None:
    """Newcomer 2: a second `up` reported "Tradeguard is up" because another suite answered on its ports."""
    supervisor = _supervisor(trading.paths.home, "--ready-timeout", "3")
    impostor = Child(registry.lookup("trading"), trading.port, free_port())
    impostor.process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(600)"
    )
    try:
        assert await supervisor.health(impostor)  # someone answers on the port…
        assert listens_on(impostor.process.pid, trading.port) is False  # …but not the child
        with pytest.raises(NotReady, match="did not answer its health check"):
            await supervisor.wait_ready(impostor)
    finally:
        impostor.process.kill()
        await impostor.process.wait()
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        assert listens_on(os.getpid(), mine.getsockname()[1]) is True


def test_plan_refuses_a_taken_or_shared_port_naming_the_variable(
    tmp_path: Path, service_ports: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = _supervisor(tmp_path, services=["keyvault", "trading"])
    assert [child.port for child in supervisor.plan()] == [
        service_ports["keyvault"],
        service_ports["trading"],
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", service_ports["trading"]))
        taken.listen()
        with pytest.raises(common.CliError) as error:
            supervisor.plan()
    assert str(error.value) == (
        f"port {service_ports['trading']} on 127.0.0.1 (trading) is already in use, by another Tradeguard "
        "suite or another program: stop it, or set TRADEGUARD_TRADING_PORT to a free port"
    )
    monkeypatch.setenv("TRADEGUARD_TRADING_METRICS_PORT", str(service_ports["keyvault"]))
    with pytest.raises(common.CliError, match="set TRADEGUARD_TRADING_METRICS_PORT to another port"):
        supervisor.plan()


def test_backoff_doubles_up_to_its_bound() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_a_service_that_keeps_crashing_is_restarted_with_backoff_then_the_suite_gives_up(
    tmp_path: Path, service_ports: dict[str, int]
) -> None:
    """Probing 6: restarts are bounded; after repeated fast crashes the supervisor stops with a clear message."""

    class Crashing(Supervisor):
        starts = 0

        def command(self, child: Child) -> list[str]:
            Crashing.starts += 1
            return [sys.executable, "-c", "raise SystemExit(3)"]

    args = main.parser().parse_args(["up", "--max-fast-crashes", "4", "--ready-timeout", "60"])
    args.home = tmp_path
    supervisor = Crashing(args, [registry.lookup("trading")])
    supervisor.backoff = Backoff(first_s=0.01, max_s=0.05, stable_s=600, max_fast_crashes=4)
    supervisor.prepare_pki()
    (child,) = supervisor.plan()
    supervisor.children[child.name] = child
    async with stopped_after(supervisor):
        await supervisor.spawn(child)
        child.ready = True  # as if it had come up once
        with pytest.raises(GaveUp) as gave_up:
            await asyncio.wait_for(supervisor.keep_running(child), 120)
    assert str(gave_up.value).startswith("trading exited 4 times in a row, each within 600s of its start")
    assert "last exit code 3" in str(gave_up.value)
    assert Crashing.starts == 4 and child.restarts == 3


def test_prepare_pki_issues_every_workload_the_cli_can_act_as(tmp_path: Path) -> None:
    """Newcomer 1: `up` issued only its own services' and ops' certificates, so `vault --as auth` failed."""
    assert set(WORKLOADS) == {"ops", *registry.SERVICES}
    _supervisor(tmp_path).prepare_pki()
    paths = pki.PkiPaths(tmp_path)
    for name in WORKLOADS:
        assert not pki.needs_renewal(paths, name), name


def test_supervisor_rotates_a_due_intermediate_then_renews_every_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = pki.PkiPaths(tmp_path)
    pki.init_ca(paths, now=datetime.now(UTC) - timedelta(days=250))  # 250 of 365 days gone: due
    old = paths.intermediate_cert.read_bytes()
    supervisor = _supervisor(tmp_path)
    supervisor.prepare_pki()
    assert "rotated the intermediate CA" in capsys.readouterr().out
    assert paths.intermediate_cert.read_bytes() != old and not pki.intermediate_due(paths)
    for name in WORKLOADS:
        assert x509.load_pem_x509_certificates(paths.cert(name).read_bytes())[
            1
        ] == x509.load_pem_x509_certificate(paths.intermediate_cert.read_bytes())
    supervisor.prepare_pki()  # nothing due any more: nothing rotated
    assert "rotated" not in capsys.readouterr().out


def test_the_suite_is_the_registrys() -> None:
    built = [name for name in registry.SUITE if (ROOT / "services" / name / "__main__.py").is_file()]
    assert [entry.name for entry in available()] == built
    assert available(("keyvault",)) == [registry.lookup("keyvault")]


def test_up_installs_the_packaged_risk_limits_owner_only_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRADEGUARD_TRADING_RISK_FILE", raising=False)
    args = Namespace(
        home=tmp_path / "home",
        cert_hours=24.0,
        check_seconds=30.0,
        ready_timeout=60.0,
        stable_seconds=60.0,
        max_fast_crashes=5,
    )
    supervisor = Supervisor(args, [registry.lookup(name) for name in registry.SUITE])
    path = supervisor.install_risk_limits()
    assert path == tmp_path / "home" / "config" / "risk.yaml"
    assert path.read_bytes() == resources.files("tradeguard.risk").joinpath("risk.yaml").read_bytes()
    assert S_IMODE(path.stat().st_mode) == 0o600 and S_IMODE(path.parent.stat().st_mode) == 0o700
    parse_risk(path.read_text(), str(path))  # valid as installed
    path.write_text("version: 1  # the risk officer's own\n")
    assert supervisor.install_risk_limits() is None and path.read_text().endswith("own\n")
    monkeypatch.setenv("TRADEGUARD_TRADING_RISK_FILE", str(tmp_path / "mine.yaml"))
    elsewhere = Supervisor(Namespace(**{**vars(args), "home": tmp_path / "other"}), supervisor.services)
    assert elsewhere.install_risk_limits() is None and not (tmp_path / "other" / "config").exists()
