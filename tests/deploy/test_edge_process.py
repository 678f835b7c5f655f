"""The real Envoy as a new user meets it: the documented command with only the documented mounts, failing closed
while the auth and rate-limit services are down, certificate rotation under a running Envoy, the only PKI files
it can see, and upstreams named by address or DNS name.

Each test starts its own Envoy (deploy/envoy rendered with test paths and free loopback ports, or deploy/envoy
itself, unchanged, in a mount and network namespace of its own). The rate limiter is the real rate-limit service
(its packaged limits) when it runs; the authoriser is `Authorizer`, which lets through as told.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from envoy.service.auth.v3 import external_auth_pb2_grpc

from services.trading.service import SERVICE as TRADING
from tests.deploy.edge_support import (
    ENVOY,
    PUBLIC_NAME,
    Authorizer,
    Edge,
    PublicTls,
    closed_port,
    public_tls,
    running_edge,
    serving,
    trading_settings,
)
from tests.support import PACKAGED_LIMITS, running_ratelimit
from tradeguard import edge
from tradeguard.cli import up_cmd
from tradeguard.cli.main import main as cli_main
from tradeguard.mesh import pki
from tradeguard.testing import dev_pki, eventually, running_service

pytestmark = pytest.mark.slow

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
HSTS = "max-age=63072000; includeSubDomains; preload"
ORDER = {
    "account_id": "acct-1",
    "client_order_id": "edge-1",
    "symbol": "BTC-USD",
    "side": "SIDE_BUY",
    "type": "ORDER_TYPE_LIMIT",
    "quantity": "0.5",
    "price": "64000.25",
}
REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("ops", "trading", "edge", "auth", "ratelimit")


def _paths(tmp_path: Path) -> pki.PkiPaths:
    paths = dev_pki(tmp_path / "home", WORKLOADS)
    pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    return paths


def _stat(edge_: Edge, name: str) -> int:
    status, body = edge_.admin(f"/stats?filter=^{name}$")
    assert status == 200, body
    [line] = body.splitlines()
    return int(line.rsplit(":", 1)[1])


@dataclass
class Started:
    edge: Edge
    paths: pki.PkiPaths
    rotate_public: Callable[[], None]
    authorizer: Authorizer | None


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """start(auth=..., ratelimit=..., trading_host=...): the trading service, the authoriser stand-in and the
    real rate-limit service if asked for (else nothing listens where the edge looks for them), and Envoy in front
    of them."""
    async with AsyncExitStack() as stack:

        async def starting(*, auth: bool, ratelimit: bool, trading_host: str = "127.0.0.1") -> Started:
            paths = _paths(tmp_path)
            trading = await stack.enter_async_context(
                running_service(TRADING, trading_settings(paths), paths)
            )
            authorizer = Authorizer() if auth else None
            upstreams = {
                "trading": edge.Endpoint(trading_host, trading.port),
                "auth": closed_port(),
                "ratelimit": closed_port(),
            }
            if authorizer is not None:
                add = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
                upstreams["auth"] = await stack.enter_async_context(serving(paths, "auth", add, authorizer))
            if ratelimit:
                limiter = await stack.enter_async_context(
                    running_ratelimit(paths, PACKAGED_LIMITS.read_text())
                )
                upstreams["ratelimit"] = edge.Endpoint("127.0.0.1", limiter.port)
            public, rotate = stack.enter_context(public_tls(tmp_path / "public"))
            running = await stack.enter_async_context(running_edge(tmp_path, paths, public, upstreams))
            return Started(running, paths, rotate, authorizer)

        yield starting


# --- fails closed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
async def test_while_the_auth_service_is_down_every_request_is_refused(
    start: Callable[..., Any], http2: bool
) -> None:
    started: Started = await start(auth=False, ratelimit=True)
    async with started.edge.client(http2=http2) as client:
        answers = [
            await client.post(PLACE, json=ORDER),
            await client.get("/tradeguard.trading.v1.TradingService/ListOrders"),
            await client.get("/"),
        ]
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert all(a.headers["strict-transport-security"] == HSTS for a in answers)
    assert _stat(started.edge, "cluster.trading.upstream_rq_total") == 0
    answered = [f"cluster.trading.ratelimit.{stat}" for stat in ("ok", "over_limit", "error")]
    assert [started.edge.counter(name) for name in answered] == [0, 0, 0]  # refused before the rate limiter


async def test_while_the_rate_limit_service_is_down_an_authorised_request_is_still_refused(
    start: Callable[..., Any],
) -> None:
    started: Started = await start(auth=True, ratelimit=False)
    async with started.edge.client(http2=True) as client:
        answer = await client.post(PLACE, json=ORDER)
    assert answer.status_code == 503, answer
    assert answer.headers["strict-transport-security"] == HSTS
    assert started.authorizer is not None and len(started.authorizer.seen) == 1  # it was authorised
    assert _stat(started.edge, "cluster.trading.upstream_rq_total") == 0


# --- upstream addresses ---------------------------------------------------------------------------------------


async def test_an_upstream_named_by_dns_is_reached(start: Callable[..., Any]) -> None:
    started: Started = await start(auth=True, ratelimit=True, trading_host="localhost")
    config = (started.edge.config_dir / "edge.yaml").read_text()
    assert "STRICT_DNS" in config and "localhost" in config
    async with started.edge.client(http2=True) as client:
        answer = await client.post(PLACE, json=ORDER)
    assert answer.status_code == 200, answer.text
    assert answer.json()["order"]["client_order_id"] == "edge-1"


# --- rotation ---------------------------------------------------------------------------------------------------


def _serial(pem_file: Path) -> int:
    return x509.load_pem_x509_certificate(pem_file.read_bytes()).serial_number


def _served_public_serial(edge_: Edge) -> int:
    context = edge_.tls_context()
    with (
        socket.create_connection(("127.0.0.1", edge_.port), timeout=2) as raw,
        context.wrap_socket(raw, server_hostname=PUBLIC_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_rotations_under_a_running_envoy_log_no_mismatch_and_serve_the_new_certificates(
    start: Callable[..., Any],
) -> None:
    started: Started = await start(auth=True, ratelimit=True)
    edge_, paths = started.edge, started.paths
    public: PublicTls = edge_.public
    for round_ in range(3):
        old_mesh, old_public = _serial(paths.cert(pki.EDGE)), public.serial()
        assert old_mesh in edge_.loaded_serials()
        assert _served_public_serial(edge_) == old_public

        assert cli_main(["pki", "issue", "edge", "--home", str(paths.home)]) == 0  # issues, then publishes
        started.rotate_public()
        new_mesh, new_public = _serial(paths.cert(pki.EDGE)), public.serial()
        assert new_mesh != old_mesh and new_public != old_public

        await eventually(lambda: new_mesh in (s := edge_.loaded_serials()) and old_mesh not in s)
        await eventually(lambda: _served_public_serial(edge_) == new_public)
        async with edge_.client(http2=True) as client:
            answer = await client.post(PLACE, json={**ORDER, "client_order_id": f"rotated-{round_}"})
        assert answer.status_code == 200, answer.text
    log = edge_.log_text()
    assert "KEY_VALUES_MISMATCH" not in log
    assert "Failed to reload certificates" not in log
    assert _stat(edge_, "cluster.trading.upstream_cx_connect_fail") == 0


# --- what the edge can see ----------------------------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, str]:
    """Every entry under `directory`: relative path -> 'link', 'dir' or the file's mode."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = Path(root) / name
            rel = str(path.relative_to(directory))
            if path.is_symlink():
                out[rel] = "link"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = oct(stat.S_IMODE(path.stat().st_mode))
    return out


def test_tradeguard_pki_publishes_only_the_ca_certificate_and_the_edges_own_pair(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = pki.PkiPaths(home)
    assert cli_main(["pki", "init", "--home", str(home)]) == 0
    assert cli_main(["pki", "issue", "edge", "--home", str(home)]) == 0
    tree = _tree(paths.edge_dir)
    [version] = [name for name, kind in tree.items() if kind == "dir"]
    assert tree == {
        "current": "link",
        version: "dir",
        f"{version}/ca.crt": "0o644",
        f"{version}/edge.crt": "0o644",
        f"{version}/edge.key": "0o600",
    }
    assert os.readlink(paths.edge_dir / "current") == version  # relative: valid wherever it is mounted
    current = paths.edge_dir / "current"
    assert (current / "ca.crt").read_bytes() == paths.ca_bundle.read_bytes()
    assert (current / "edge.crt").read_bytes() == paths.cert("edge").read_bytes()
    assert pki.key_pair_matches((current / "edge.crt").read_bytes(), (current / "edge.key").read_bytes())
    assert not [p for p in paths.edge_dir.rglob("*") if p.name.endswith("-ca.key") or "ca.key" in p.name]
    assert paths.root_key.exists() and paths.intermediate_key.exists()  # they exist, just not there

    # renewing when fresh publishes nothing new; each renewal keeps at most the previous version
    assert cli_main(["pki", "renew", "edge", "--home", str(home)]) == 0
    assert _tree(paths.edge_dir) == tree
    for _ in range(3):
        assert cli_main(["pki", "issue", "edge", "--home", str(home)]) == 0
    versions = [name for name, kind in _tree(paths.edge_dir).items() if kind == "dir"]
    assert len(versions) == 2 and version not in versions
    assert (paths.edge_dir / "current" / "edge.crt").read_bytes() == paths.cert("edge").read_bytes()


def test_tradeguard_up_issues_and_publishes_the_edge_bundle(tmp_path: Path) -> None:
    args = argparse.Namespace(
        home=tmp_path / "home",
        cert_hours=24.0,
        check_seconds=30.0,
        ready_timeout=10.0,
        stable_seconds=60.0,
        max_fast_crashes=5,
    )
    supervisor = up_cmd.Supervisor(args, services=[])
    supervisor.prepare_pki()
    paths = supervisor.paths
    current = paths.edge_dir / "current"
    assert sorted(p.name for p in current.iterdir()) == ["ca.crt", "edge.crt", "edge.key"]
    assert (current / "edge.crt").read_bytes() == paths.cert("edge").read_bytes()
    assert supervisor.renew() == []  # nothing due: nothing re-issued, nothing re-published
    assert len([p for p in paths.edge_dir.iterdir() if p.name.startswith(".v-")]) == 1


def test_concurrent_publishers_always_leave_a_complete_matching_bundle_behind_current(tmp_path: Path) -> None:
    """`tradeguard up` renewing while a timer runs `tradeguard pki renew edge`: `current` always names a complete
    version whose key matches its certificate, and no publisher removes the version another made current."""
    paths = dev_pki(tmp_path / "home", ("edge",))
    pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    current = paths.edge_dir / "current"
    stop = threading.Event()
    broken: list[str] = []

    def read() -> None:  # as a reader that resolves `current` once per reload
        while not stop.is_set():
            version = paths.edge_dir / os.readlink(current)
            try:
                cert, key = (version / "edge.crt").read_bytes(), (version / "edge.key").read_bytes()
            except FileNotFoundError:  # gone only once two newer versions followed it
                if paths.edge_dir / os.readlink(current) == version:
                    broken.append(f"current -> {version.name}, which is incomplete or gone")
                continue
            if not pki.key_pair_matches(cert, key):
                broken.append(f"{version.name}: key and certificate do not match")

    def publish() -> None:
        try:
            for _ in range(8):
                pki.issue(paths, pki.EDGE)
                pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
        except Exception as error:  # one publisher removing what another is writing
            broken.append(f"publisher failed: {error!r}")

    reader = threading.Thread(target=read)
    reader.start()
    publishers = [threading.Thread(target=publish) for _ in range(2)]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join()
    stop.set()
    reader.join()
    assert broken == []
    assert (current / "edge.crt").read_bytes() == paths.cert(pki.EDGE).read_bytes()
    assert len(list(paths.edge_dir.glob(".v-*"))) == 2 and not list(paths.edge_dir.glob(".current.*"))


def test_a_mismatched_pair_is_never_published(tmp_path: Path) -> None:
    paths = dev_pki(tmp_path / "home", ("edge", "ops"))
    paths.key("edge").write_bytes(paths.key("ops").read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    assert not (paths.edge_dir / "current").exists()


# --- the documented command, with only the documented mounts ---------------------------------------------------

_DOCUMENTED = r"""
set -eu
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$T/etc-upper,workdir=$T/etc-work" /etc
for dir in envoy edge public; do mkdir -p /etc/tradeguard/$dir; done
mount --bind "$REPO/deploy/envoy" /etc/tradeguard/envoy
mount --bind "$HOMEDIR/edge" /etc/tradeguard/edge
mount --bind "$T/public" /etc/tradeguard/public
for dir in envoy edge public; do mount -o remount,bind,ro /etc/tradeguard/$dir; done
ip link set lo up
"$ENVOY" --mode validate -c /etc/tradeguard/envoy/edge.yaml > "$T/validate.log" 2>&1
"$ENVOY" -c /etc/tradeguard/envoy/edge.yaml > "$T/envoy.log" 2>&1 &
pid=$!
tries=0
until curl -sf http://127.0.0.1:9901/ready > "$T/ready.txt"; do
  tries=$((tries + 1)); [ $tries -lt 300 ] || { kill $pid; exit 3; }; sleep 0.1
done
curl -sf http://127.0.0.1:9901/certs > "$T/certs.json"
curl -s -o /dev/null -D "$T/headers.txt" --cacert "$T/public-ca.crt" --resolve localhost:8443:127.0.0.1 \
  -H 'content-type: application/json' -d '{}' \
  https://localhost:8443/tradeguard.trading.v1.TradingService/PlaceOrder
kill $pid
wait $pid || true
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_the_documented_command_starts_with_only_the_documented_mounts(tmp_path: Path) -> None:
    """`envoy -c /etc/tradeguard/envoy/edge.yaml` on deploy/envoy unchanged, in a mount namespace where
    /etc/tradeguard holds only the three documented mounts (read-only) and a network namespace of its own (the
    documented ports, colliding with nothing): it validates, starts, loads the edge's certificates and serves,
    refusing with 503 and HSTS (fail closed: no auth service runs there)."""
    paths = dev_pki(tmp_path / "home", WORKLOADS, trust_domain="tradeguard.local")
    assert cli_main(["pki", "renew", "edge", "--home", str(paths.home)]) == 0  # publishes the bundle
    for directory in ("etc-upper", "etc-work"):
        (tmp_path / directory).mkdir()
    with public_tls(tmp_path / "public"):
        env = {
            **os.environ,
            "T": str(tmp_path),
            "REPO": str(REPO),
            "HOMEDIR": str(paths.home),
            "ENVOY": str(ENVOY),
        }
        namespaces = ["unshare", "--mount", "--net", "--fork"]
        if os.geteuid() != 0:
            namespaces.insert(1, "--map-root-user")
        done = subprocess.run(
            [*namespaces, "sh", "-c", _DOCUMENTED],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    logs = {
        name: (tmp_path / name).read_text()
        for name in ("validate.log", "envoy.log")
        if (tmp_path / name).exists()
    }
    assert done.returncode == 0, (done.stdout, done.stderr, logs)
    assert "configuration '/etc/tradeguard/envoy/edge.yaml' OK" in logs["validate.log"]
    assert (tmp_path / "ready.txt").read_text() == "LIVE\n"
    assert f"{_serial(paths.cert('edge')):x}" in (tmp_path / "certs.json").read_text()
    headers = (tmp_path / "headers.txt").read_text().lower()
    assert headers.startswith("http/2 503"), headers
    assert f"strict-transport-security: {HSTS.lower()}" in headers
    assert "critical" not in logs["envoy.log"] and "KEY_VALUES_MISMATCH" not in logs["envoy.log"]
