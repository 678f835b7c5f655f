"""The mesh's transport: TLS 1.3 only, client certificates from our CA required, hot reload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import openssl_handshake
from tradeguard.mesh import handshake_log, pki, tls
from tradeguard.testing import eventually

if TYPE_CHECKING:
    from tests.conftest import RunningTrading


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


async def test_tls12_client_with_valid_certificate_is_refused(trading: RunningTrading) -> None:
    p = trading.paths
    out = await asyncio.to_thread(openssl_handshake, trading.port, p, "ops", "tls1_2")
    assert "Protocol version" not in out
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx = client_ctx(p, "ops")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        await asyncio.to_thread(handshake, trading.port, ctx)


async def test_tls13_client_with_valid_certificate_is_accepted(trading: RunningTrading) -> None:
    p = trading.paths
    out = await asyncio.to_thread(openssl_handshake, trading.port, p, "ops", "tls1_3")
    assert "Protocol version: TLSv1.3" in out
    assert await asyncio.to_thread(handshake, trading.port, client_ctx(p, "ops")) == "TLSv1.3"


async def test_self_probe_reports_refusal(trading: RunningTrading) -> None:
    # the start-up guard itself: a TLS 1.2 client is refused, so it returns quietly
    await asyncio.to_thread(
        tls.assert_tls12_refused, "127.0.0.1", trading.port, tls.Workload.of(trading.paths, "ops")
    )


async def test_client_without_certificate_is_refused(trading: RunningTrading) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(handshake, trading.port, client_ctx(trading.paths, None))


async def _health(target: str, workload: tls.Workload) -> int:
    creds = tls.channel_credentials(workload)
    async with grpc.aio.secure_channel(
        target, creds, options=[("grpc.ssl_target_name_override", "trading")]
    ) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_client_from_another_ca_is_refused(trading: RunningTrading, tmp_path: Path) -> None:
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


async def test_expired_client_certificate_is_refused(trading: RunningTrading) -> None:
    p = trading.paths
    pki.issue(p, "ops", now=datetime.now(UTC) - timedelta(days=2), lifetime=timedelta(hours=1))
    assert pki.read_cert_info(p.cert("ops")).expired(datetime.now(UTC))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(trading.target, tls.Workload.of(p, "ops"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_valid_client_reaches_health(trading: RunningTrading) -> None:
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


async def test_rotation_new_handshakes_get_new_certificate_while_calls_succeed(
    trading: RunningTrading,
) -> None:
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
async def test_client_naming_another_service_refuses_this_server(
    trading: RunningTrading, authority: str
) -> None:
    # the trading server's certificate names only "trading": it cannot answer for another workload
    creds = tls.channel_credentials(tls.Workload.of(trading.paths, "ops"))
    async with grpc.aio.secure_channel(
        trading.target, creds, options=[("grpc.ssl_target_name_override", authority)]
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# --- refused handshakes as structured events; a quiet self-probe (tradeguard.mesh.handshake_log) -------------

_CAPTURED_SERVER = """
import asyncio, os, sys
from pathlib import Path
import tradeguard
from tradeguard.mesh import handshake_log
handshake_log.install()
from tradeguard.observability.logging import configure_logging
configure_logging(json=True)
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.server import MeshServer, ServerConfig

async def main():
    config = ServerConfig(name="trading", port=0, home=Path(sys.argv[1]), drain_s=0.0, grace_s=0.0)
    server = MeshServer(config, MethodPolicy("tradeguard.test", {}), [])
    print(await server.start(), flush=True)
    os.write(2, b"a native line \\x01 passes through\\n")
    await asyncio.to_thread(sys.stdin.readline)  # the test's handshakes happen meanwhile
    await server.stop(grace=0, drain=0)
    os.write(2, b"a last half line")

asyncio.run(main())
"""

_RAW_HANDSHAKE_LINE = re.compile(r"^[IWEF]\d{4} .*Handshake failed", re.MULTILINE)


def _events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


async def test_refused_handshakes_are_structured_events_and_the_self_probe_is_quiet(
    pki_paths: pki.PkiPaths, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CAPTURED_SERVER,
            str(pki_paths.home),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), timeout=60))
        # a TLS 1.2 client with a valid certificate, and a TLS 1.3 client without one
        out = await asyncio.to_thread(openssl_handshake, port, pki_paths, "ops", "tls1_2")
        assert "Protocol version" not in out
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(handshake, port, client_ctx(pki_paths, None))

        def refusals() -> list[dict[str, object]]:
            return [e for e in _events(stderr_path.read_text()) if e.get("event") == "tls_handshake_refused"]

        await eventually(lambda: len(refusals()) >= 2, within_s=30)
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = stderr_path.read_text()
    events = _events(text)
    refused = [e for e in events if e.get("event") == "tls_handshake_refused"]
    assert sorted(str(e["reason"]) for e in refused) == [
        "NO_SHARED_CIPHER",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    ]
    assert all(e["level"] == "warning" and e["logger"] == "tradeguard.tls" and "peer" in e for e in refused)
    probe = [e for e in events if e.get("event") == "tls12_self_probe_refused"]
    assert len(probe) == 1 and probe[0]["level"] == "info", text
    assert any(e.get("event") == "serving" for e in events), text
    assert not _RAW_HANDSHAKE_LINE.search(text), text  # grpc's raw lines became the events above
    assert "a native line \x01 passes through\n" in text  # anything else unchanged
    assert text.endswith("a last half line")  # forwarded at exit, even without its newline


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            b"I1130 09:06:12.851631    8458 ssl_transport_security.cc:2563] Handshake failed with error "
            b"SSL_ERROR_SSL: error:100000b8:SSL routines:OPENSSL_internal:NO_SHARED_CIPHER: Invalid certificate "
            b"verification context",
            "NO_SHARED_CIPHER",
        ),
        (
            b"E1130 09:06:12.854156 8458 ssl_transport_security.cc:2563] Handshake failed with error "
            b"SSL_ERROR_SSL: error:1000009c:SSL routines:OPENSSL_internal:HTTP_REQUEST: x",
            "HTTP_REQUEST",
        ),
        (
            b"I1130 09:06:12.854156 8458 ssl_transport_security.cc:99] Handshake failed with fatal error "
            b"SSL_ERROR_SYSCALL: errno 104",
            "SSL_ERROR_SYSCALL",
        ),
        (b'{"event": "Handshake failed with error SSL_ERROR_SSL"}', None),  # not grpc's: left alone
        (b"I1130 09:06:12.854156 8458 chttp2_server.cc:1] something else", None),
        (b"", None),
    ],
)
def test_grpc_handshake_lines_are_recognised(line: bytes, reason: str | None) -> None:
    refusal = handshake_log.parse_handshake_line(line)
    assert (refusal.reason if refusal is not None else None) == reason


_FLOOD = """
import os, sys, threading
import tradeguard
from tradeguard.observability.logging import configure_logging
configure_logging(json=True)  # before install: the events themselves go through the pipe being drained
from tradeguard.mesh import handshake_log
handshake_log.install()
line = (b"I1130 09:06:12.851631    8458 ssl_transport_security.cc:2563] Handshake failed with error "
        b"SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: x\\n")

def flood():
    for i in range(int(sys.argv[1])):
        os.write(2, line)
        os.write(2, b"other %d\\n" % i)

threads = [threading.Thread(target=flood) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
"""


async def test_a_flood_of_refusals_neither_blocks_the_process_nor_loses_other_lines(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _FLOOD, "2000", stderr=stderr)
    assert await asyncio.wait_for(proc.wait(), timeout=120) == 0
    text = stderr_path.read_text()
    events = [e for e in _events(text) if e.get("event") == "tls_handshake_refused"]
    assert len(events) == 4000  # far past a pipe's 64 KiB: the reader never waits on its own pipe
    assert sum(1 for line in text.splitlines() if line.startswith("other ")) == 4000
    assert not _RAW_HANDSHAKE_LINE.search(text)
