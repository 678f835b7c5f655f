"""The mesh's transport: TLS 1.3 only, client certificates from our CA required, hot reload."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import eventually, openssl_handshake
from tradeguard.mesh import pki, tls


def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """The negotiated TLS version, or raises ssl.SSLError / ConnectionError when refused."""
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="trading") as conn,
    ):
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        # a TLS 1.3 server checks the client certificate after the client's handshake "completes":
        # a refused client learns it when the server closes the connection instead of answering
        if not conn.recv(1):
            raise ConnectionError("closed by the server")
        version = conn.version()
        assert version is not None
        return version


def client_ctx(paths: pki.PkiPaths, name: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(paths.ca_bundle))
    if name is not None:
        ctx.load_cert_chain(str(paths.cert(name)), str(paths.key(name)))
    return ctx


async def test_tls12_client_with_valid_certificate_is_refused(trading) -> None:
    p = trading.paths
    out = await asyncio.to_thread(openssl_handshake, trading.port, p, "ops", "tls1_2")
    assert "Protocol version" not in out
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx = client_ctx(p, "ops")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        await asyncio.to_thread(handshake, trading.port, ctx)


async def test_tls13_client_with_valid_certificate_is_accepted(trading) -> None:
    p = trading.paths
    out = await asyncio.to_thread(openssl_handshake, trading.port, p, "ops", "tls1_3")
    assert "Protocol version: TLSv1.3" in out
    assert await asyncio.to_thread(handshake, trading.port, client_ctx(p, "ops")) == "TLSv1.3"


async def test_self_probe_reports_refusal(trading) -> None:
    # the start-up guard itself: a TLS 1.2 client is refused, so it returns quietly
    await asyncio.to_thread(
        tls.assert_tls12_refused, "127.0.0.1", trading.port, tls.Workload.of(trading.paths, "ops")
    )


async def test_client_without_certificate_is_refused(trading) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(handshake, trading.port, client_ctx(trading.paths, None))


async def _health(target: str, workload: tls.Workload) -> int:
    creds = tls.channel_credentials(workload)
    async with grpc.aio.secure_channel(
        target, creds, options=[("grpc.ssl_target_name_override", "trading")]
    ) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_client_from_another_ca_is_refused(trading, tmp_path: Path) -> None:
    other = pki.PkiPaths(tmp_path / "other")
    pki.init_ca(other, "tradeguard.test")  # same trust domain, different CA
    pki.issue(other, "ops")
    # presents the other CA's certificate while trusting ours for the server
    workload = tls.Workload(cert=other.cert("ops"), key=other.key("ops"), ca=trading.paths.ca_bundle)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(trading.target, workload)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(trading.paths.ca_bundle))
        ctx.load_cert_chain(str(other.cert("ops")), str(other.key("ops")))
        await asyncio.to_thread(handshake, trading.port, ctx)


async def test_expired_client_certificate_is_refused(trading) -> None:
    p = trading.paths
    pki.issue(p, "ops", now=datetime.now(UTC) - timedelta(days=2), lifetime=timedelta(hours=1))
    assert pki.read_cert_info(p.cert("ops")).expired(datetime.now(UTC))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(trading.target, tls.Workload.of(p, "ops"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_valid_client_reaches_health(trading) -> None:
    assert (
        await _health(trading.target, tls.Workload.of(trading.paths, "monitor"))
        == health_pb2.HealthCheckResponse.SERVING
    )


def _served_certificate(port: int, paths: pki.PkiPaths) -> bytes:
    ctx = client_ctx(paths, "ops")
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="trading") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return der


async def test_rotation_new_handshakes_get_new_certificate_while_calls_succeed(trading) -> None:
    p = trading.paths
    before = await asyncio.to_thread(_served_certificate, trading.port, p)
    stop = asyncio.Event()
    results: list[int] = []

    async def keep_calling() -> None:
        while not stop.is_set():
            results.append(await _health(trading.target, tls.Workload.of(p, "ops")))

    caller = asyncio.create_task(keep_calling())
    await eventually(lambda: len(results) >= 3)
    pki.issue(p, "trading")  # what the supervisor does at half-life
    calls_before_rotation = len(results)
    await eventually(lambda: len(results) >= calls_before_rotation + 3)  # calls went on after the rotation
    after = await asyncio.to_thread(_served_certificate, trading.port, p)
    stop.set()
    await caller
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert(
        p.cert("trading").read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    assert results and all(r == health_pb2.HealthCheckResponse.SERVING for r in results)
    assert trading.server.reloader is not None and trading.server.reloader.reloads == 1


async def test_reloader_keeps_old_pair_while_key_and_certificate_disagree(pki_paths: pki.PkiPaths) -> None:
    reloader = tls.CertificateReloader(tls.Workload.of(pki_paths, "trading"))
    other = pki_paths.key("ops").read_bytes()
    pki_paths.key("trading").write_bytes(other)  # a new key beside the old certificate: mid-rotation
    assert reloader.fetch() is None
    pki.issue(pki_paths, "trading")
    assert reloader.fetch() is not None
    assert reloader.fetch() is None  # unchanged files: nothing to do


_LATE_IMPORT = """
import asyncio, sys, warnings
from pathlib import Path
import grpc  # before tradeguard: the TLS 1.3-only setting comes too late
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tradeguard
assert any("imported before tradeguard" in str(w.message) for w in caught)
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.server import MeshServer, ServerConfig
from tradeguard.mesh.tls import Tls12Accepted

async def main():
    server = MeshServer(ServerConfig(name="trading", port=0, home=Path(sys.argv[1])), MethodPolicy("tradeguard.test", {}), [])
    try:
        await server.start()
    except Tls12Accepted:
        print("refused to serve")
        return
    print("SERVING")

asyncio.run(main())
"""


def test_server_refuses_to_run_when_tls12_would_be_accepted(pki_paths: pki.PkiPaths) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    out = subprocess.run(
        [sys.executable, "-c", _LATE_IMPORT, str(pki_paths.home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "refused to serve" in out.stdout, out.stdout + out.stderr
    assert "SERVING" not in out.stdout


@pytest.mark.parametrize("authority", ["keyvault", "localhost", "127.0.0.1"])
async def test_client_naming_another_service_refuses_this_server(trading, authority: str) -> None:
    # the trading server's certificate names only "trading": it cannot answer for another workload
    creds = tls.channel_credentials(tls.Workload.of(trading.paths, "ops"))
    async with grpc.aio.secure_channel(
        trading.target, creds, options=[("grpc.ssl_target_name_override", authority)]
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
