"""peer_spiffe_id on real mTLS calls: the one spiffe:// URI SAN of a certificate our CA signed, else nobody."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.tradeguard.mesh.forged import forged_leaf, private_pem
from tradeguard.mesh import pki, tls
from tradeguard.mesh.identity import peer_spiffe_id

TD = "tradeguard.local"


def _leaf(p: pki.PkiPaths, *, common_name: str, uris: list[str] | None) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) of a client leaf the real intermediate signed; `uris` None: no SAN at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = forged_leaf(p, uris, key, common_name=common_name, dns_names=())
    return private_pem(key), leaf.public_bytes(serialization.Encoding.PEM) + p.intermediate_cert.read_bytes()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.seen.append(peer_spiffe_id(context))
        self.seen.append(peer_spiffe_id(context))  # the second read is the call's cached one
        return request


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[pki.PkiPaths, int, Recorder]]:
    paths = pki.PkiPaths(tmp_path / "home")
    pki.init_ca(paths, name_constraints=False)  # so that the CA can sign the odd leaves below
    pki.issue(paths, "echo")
    recorder = Recorder()
    grpc_server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(recorder.echo)
    grpc_server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {"Echo": handler})])
    creds, _reloader = tls.server_credentials(tls.Workload.of(paths, "echo"))
    port = grpc_server.add_secure_port("127.0.0.1:0", creds)
    await grpc_server.start()
    try:
        yield paths, port, recorder
    finally:
        await grpc_server.stop(None)


async def _call(paths: pki.PkiPaths, port: int, key_pem: bytes, chain_pem: bytes) -> None:
    creds = grpc.ssl_channel_credentials(paths.ca_bundle.read_bytes(), key_pem, chain_pem)
    options = [("grpc.ssl_target_name_override", "echo")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        assert await channel.unary_unary("/t.Echo/Echo", None, None)(b"ping", timeout=30) == b"ping"


async def test_a_workload_certificate_names_its_workload(server: tuple[pki.PkiPaths, int, Recorder]) -> None:
    paths, port, recorder = server
    pki.issue(paths, "ops")
    await _call(paths, port, paths.key("ops").read_bytes(), paths.cert("ops").read_bytes())
    assert recorder.seen == [f"spiffe://{TD}/svc/ops"] * 2


@pytest.mark.parametrize(
    ("common_name", "uris"),
    [
        ("two", [f"spiffe://{TD}/svc/ops", f"spiffe://{TD}/svc/auth"]),  # two SPIFFE IDs: which one?
        (f"spiffe://{TD}/svc/ops", None),  # no SAN: grpc's identity is the common name, never a SPIFFE ID
        ("web", ["https://example.com/svc/ops"]),  # a URI SAN that is not a SPIFFE ID
    ],
)
async def test_a_certificate_without_exactly_one_spiffe_uri_names_nobody(
    server: tuple[pki.PkiPaths, int, Recorder], common_name: str, uris: list[str] | None
) -> None:
    paths, port, recorder = server
    await _call(paths, port, *_leaf(paths, common_name=common_name, uris=uris))
    assert recorder.seen == [None, None]
