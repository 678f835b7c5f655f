"""The ``caller`` field carries the client's SPIFFE ID over a real mutual-TLS connection."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from tradeguard.observability.interceptor import TelemetryInterceptor
from tradeguard.observability.logging import configure_logging
from tradeguard.observability.metrics import RpcMetrics

CLIENT_ID = "spiffe://tradeguard.test/svc/trading"


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def test_caller_is_the_peer_spiffe_id() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, None, ca=True, sans=[])
    issuer = (ca.subject, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert(
        "server",
        server_key,
        issuer,
        ca=False,
        sans=[x509.DNSName("localhost"), x509.UniformResourceIdentifier("spiffe://tradeguard.test/svc/auth")],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _cert(
        "client", client_key, issuer, ca=False, sans=[x509.UniformResourceIdentifier(CLIENT_ID)]
    )

    server = grpc.aio.server(
        interceptors=[TelemetryInterceptor("test", RpcMetrics("test", registry=CollectorRegistry()))]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Tls", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(_key_pem(server_key), _pem(server_cert))], root_certificates=_pem(ca), require_client_auth=True
        ),
    )
    await server.start()
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(ca), private_key=_key_pem(client_key), certificate_chain=_pem(client_cert)
        )
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", credentials, options=(("grpc.ssl_target_name_override", "localhost"),)
        ) as channel:
            assert (
                await channel.unary_unary(
                    "/test.Tls/Echo", request_serializer=None, response_deserializer=None
                )(b"hi")
                == b"hi"
            )
    finally:
        await server.stop(None)
    [line] = [json.loads(raw) for raw in out.getvalue().splitlines() if '"rpc"' in raw]
    assert line["caller"] == CLIENT_ID
    assert line["code"] == "OK"
