"""The internal PKI with real keys and certificates (no mocks), and real gRPC handshakes over them."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator, Mapping
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tests.tradeguard.mesh.forged import forged_leaf, private_pem
from tradeguard.mesh import pki

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def paths(tmp_path: Path) -> pki.PkiPaths:
    """A PKI without the URI name constraint, so cryptography's verifier can check chains."""
    p = pki.PkiPaths(tmp_path / "home")
    assert pki.init_ca(p, now=NOW - timedelta(days=1), name_constraints=False)
    return p


@pytest.fixture
def constrained(tmp_path: Path) -> pki.PkiPaths:
    """The default PKI: the intermediate carries a URI name constraint for the trust domain."""
    p = pki.PkiPaths(tmp_path / "constrained")
    assert pki.init_ca(p)
    return p


def _chain(p: pki.PkiPaths, name: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(p.cert(name).read_bytes())


def _root(p: pki.PkiPaths) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.ca_bundle.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- init ---------------------------------------------------------------------------------------------------


def test_init_is_idempotent_and_keys_are_private(tmp_path: Path) -> None:
    p = pki.PkiPaths(tmp_path)
    assert pki.init_ca(p, "corp.example")
    before = {f: f.read_bytes() for f in (p.root_cert, p.root_key, p.intermediate_cert, p.intermediate_key)}
    assert not pki.init_ca(p, "corp.example")
    assert {f: f.read_bytes() for f in before} == before
    assert pki.trust_domain(p) == "corp.example"
    assert _mode(p.dir) == 0o700
    assert _mode(p.root_key) == 0o600
    assert _mode(p.intermediate_key) == 0o600
    assert p.ca_bundle.read_bytes() == p.root_cert.read_bytes()
    assert not [f for f in p.dir.iterdir() if f.name.endswith(".tmp")]


def test_init_refuses_another_trust_domain(paths: pki.PkiPaths) -> None:
    with pytest.raises(ValueError, match=r"already exists for trust domain 'tradeguard\.local'"):
        pki.init_ca(paths, "other.example")


@pytest.mark.parametrize("td", ["", "UPPER.example", "a..b", "-x.example", "x_y", "spiffe://x", "a/b"])
def test_init_rejects_bad_trust_domain(tmp_path: Path, td: str) -> None:
    with pytest.raises(ValueError, match="invalid trust domain"):
        pki.init_ca(pki.PkiPaths(tmp_path), td)
    assert not (tmp_path / "pki" / "root-ca.key").exists()


def test_init_recreates_a_missing_intermediate_under_the_same_root(paths: pki.PkiPaths) -> None:
    root = paths.root_cert.read_bytes()
    paths.intermediate_cert.unlink()
    assert pki.init_ca(paths)
    assert paths.root_cert.read_bytes() == root
    _root(paths).public_key()
    x509.load_pem_x509_certificate(paths.intermediate_cert.read_bytes()).verify_directly_issued_by(
        _root(paths)
    )


def test_ca_certificates_profile(paths: pki.PkiPaths, constrained: pki.PkiPaths) -> None:
    root = _root(paths)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(days=3650, minutes=5)

    inter = x509.load_pem_x509_certificate(constrained.intermediate_cert.read_bytes())
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    nc = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier("tradeguard.local")]
    unconstrained = x509.load_pem_x509_certificate(paths.intermediate_cert.read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        unconstrained.extensions.get_extension_for_class(x509.NameConstraints)


def test_group_readable_ca_key_is_refused(paths: pki.PkiPaths) -> None:
    os.chmod(paths.intermediate_key, 0o640)
    with pytest.raises(PermissionError, match=r"refusing to load CA key .*intermediate-ca.key.*0o640"):
        pki.issue(paths, "auth", now=NOW)
    os.chmod(paths.intermediate_key, 0o600)
    pki.issue(paths, "auth", now=NOW)


# --- issue --------------------------------------------------------------------------------------------------


def test_issued_leaf_profile(paths: pki.PkiPaths) -> None:
    info = pki.issue(paths, "auth", now=NOW)
    assert info.name == "auth"
    assert info.path == paths.cert("auth")
    assert info.spiffe_id == "spiffe://tradeguard.local/svc/auth" == pki.spiffe_id("tradeguard.local", "auth")
    assert info.not_after - NOW == timedelta(hours=24)  # default lifetime
    assert NOW - info.not_before == timedelta(minutes=5)  # clock skew allowance
    assert _mode(paths.key("auth")) == 0o600

    leaf, inter = _chain(paths, "auth")
    assert inter.public_bytes(serialization.Encoding.PEM) == paths.intermediate_cert.read_bytes()
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "auth"
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Tradeguard"
    assert 0 < leaf.serial_number < 2**159
    assert leaf.signature_hash_algorithm is not None
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    ext = leaf.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(leaf_key).digest
    assert (
        aki.key_identifier == inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )

    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [info.spiffe_id]
    # only the workload's own name: a name every workload shared would let any of them answer for another
    assert san.get_values_for_type(x509.DNSName) == ["auth"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert pki.peer_spiffe_id_from_pem(paths.cert("auth").read_bytes()) == info.spiffe_id


def test_chain_verifies_root_intermediate_leaf(paths: pki.PkiPaths) -> None:
    pki.issue(paths, "auth", now=NOW)
    leaf, *intermediates = _chain(paths, "auth")
    policy = PolicyBuilder().store(Store([_root(paths)])).time(NOW)

    client = policy.build_client_verifier().verify(leaf, intermediates)
    assert len(client.chain) == 3
    assert client.subjects is not None
    assert x509.UniformResourceIdentifier("spiffe://tradeguard.local/svc/auth") in client.subjects

    assert len(policy.build_server_verifier(DNSName("auth")).verify(leaf, intermediates)) == 3
    for other in (DNSName("gateway"), DNSName("localhost"), IPAddress(ipaddress.IPv4Address("127.0.0.1"))):
        with pytest.raises(VerificationError):
            policy.build_server_verifier(other).verify(leaf, intermediates)
    with pytest.raises(VerificationError):  # not trusted without the intermediate
        policy.build_client_verifier().verify(leaf, [])
    with pytest.raises(VerificationError):  # expired a day later
        PolicyBuilder().store(Store([_root(paths)])).time(
            NOW + timedelta(days=1, seconds=1)
        ).build_client_verifier().verify(leaf, intermediates)


def test_cryptography_verifier_does_not_support_uri_name_constraints(constrained: pki.PkiPaths) -> None:
    """Why ``paths`` turns name constraints off; the gRPC tests below cover the constrained chain."""
    pki.issue(constrained, "auth")
    leaf, *intermediates = _chain(constrained, "auth")
    with pytest.raises(VerificationError, match="unsupported name constraint"):
        PolicyBuilder().store(Store([_root(constrained)])).build_client_verifier().verify(leaf, intermediates)


def test_expired_certificate(paths: pki.PkiPaths) -> None:
    now = datetime.now(UTC)
    pki.issue(paths, "old", now=now - timedelta(days=2), lifetime=timedelta(hours=1))
    info = pki.read_cert_info(paths.cert("old"))
    assert info.name == "old"
    assert info.expired(now)
    assert info.past_half_life(now)
    assert info.remaining(now) < -timedelta(days=1)
    fresh = pki.issue(paths, "fresh", now=now)
    assert not fresh.expired(now) and not fresh.past_half_life(now)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Auth",
        "1auth",
        "-auth",
        "au_th",
        "auth.svc",
        "a" * 64,
        "../auth",
        "auth/x",
        "root-ca",
        "intermediate-ca",
        "ca",
    ],
)
def test_bad_names_rejected(paths: pki.PkiPaths, name: str) -> None:
    with pytest.raises(ValueError, match="invalid workload name"):
        pki.issue(paths, name, now=NOW)
    with pytest.raises(ValueError, match="invalid workload name"):
        pki.spiffe_id("tradeguard.local", name)
    with pytest.raises(ValueError, match="invalid workload name"):
        paths.cert(name)
    assert pki.spiffe_id("tradeguard.local", "a" * 63).endswith("/svc/" + "a" * 63)


def test_issue_before_init_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tradeguard pki init"):
        pki.issue(pki.PkiPaths(tmp_path), "auth")


def test_leaf_never_outlives_the_intermediate(tmp_path: Path) -> None:
    p = pki.PkiPaths(tmp_path)
    pki.init_ca(p, now=NOW, intermediate_lifetime=timedelta(hours=10))
    info = pki.issue(p, "auth", now=NOW)
    assert info.not_after == NOW + timedelta(hours=10)
    with pytest.raises(ValueError, match=r"intermediate CA .* expired"):
        pki.issue(p, "auth", now=NOW + timedelta(hours=10))


# --- renewal ------------------------------------------------------------------------------------------------


def test_needs_renewal(paths: pki.PkiPaths) -> None:
    assert pki.needs_renewal(paths, "auth", NOW)  # missing
    pki.issue(paths, "auth", now=NOW)
    assert not pki.needs_renewal(paths, "auth", NOW)
    assert not pki.needs_renewal(paths, "auth", NOW + timedelta(hours=11))
    assert pki.needs_renewal(paths, "auth", NOW + timedelta(hours=12))  # past half-life
    assert pki.needs_renewal(paths, "auth", NOW + timedelta(hours=25))  # expired


def test_needs_renewal_when_key_does_not_match(paths: pki.PkiPaths) -> None:
    pki.issue(paths, "auth", now=NOW)
    pki.issue(paths, "gateway", now=NOW)
    paths.key("auth").write_bytes(paths.key("gateway").read_bytes())  # a new key beside the old certificate
    assert pki.needs_renewal(paths, "auth", NOW)
    assert not pki.needs_renewal(paths, "gateway", NOW)


def test_needs_renewal_when_unreadable_or_from_another_ca(
    paths: pki.PkiPaths, constrained: pki.PkiPaths
) -> None:
    pki.issue(paths, "auth", now=NOW)
    pki.issue(paths, "gateway", now=NOW)
    paths.cert("auth").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n")
    assert pki.needs_renewal(paths, "auth", NOW)
    pki.issue(constrained, "gateway")  # a valid pair, but signed by another intermediate
    paths.key("gateway").write_bytes(constrained.key("gateway").read_bytes())
    paths.cert("gateway").write_bytes(constrained.cert("gateway").read_bytes())
    assert pki.needs_renewal(paths, "gateway", NOW)


def test_renewal_reason_says_why_a_certificate_is_due(paths: pki.PkiPaths, constrained: pki.PkiPaths) -> None:
    """What `pki status` shows beside RENEW: the rule `needs_renewal` applies, with its reason."""
    assert pki.renewal_reason(paths, "auth", NOW) == "missing or unreadable"
    pki.issue(paths, "auth", now=NOW)
    assert pki.renewal_reason(paths, "auth", NOW) is None
    assert pki.renewal_reason(paths, "auth", NOW + timedelta(hours=12)) == "past half its lifetime"
    assert pki.renewal_reason(paths, "auth", NOW + timedelta(hours=25)) == "expired"
    pki.issue(paths, "gateway", now=NOW)
    paths.key("gateway").write_bytes(paths.key("auth").read_bytes())
    assert pki.renewal_reason(paths, "gateway", NOW) == "key does not match"
    pki.rotate_intermediate(paths, now=NOW + timedelta(hours=1))
    assert (
        pki.renewal_reason(paths, "auth", NOW + timedelta(hours=2))
        == "not issued by the current intermediate CA"
    )
    pki.issue(constrained, "other")
    for suffix in ("crt", "key"):
        (paths.dir / f"other.{suffix}").write_bytes((constrained.dir / f"other.{suffix}").read_bytes())
    assert pki.renewal_reason(paths, "other") == "not issued by the current intermediate CA"


def test_renew_due_renews_only_due_names(paths: pki.PkiPaths) -> None:
    pki.issue(paths, "auth", now=NOW)
    pki.issue(paths, "audit", now=NOW - timedelta(hours=13))  # past half-life at NOW
    old_auth = paths.cert("auth").read_bytes()
    renewed = pki.renew_due(paths, ["auth", "audit", "ratelimit"], NOW)
    assert renewed == ["audit", "ratelimit"]
    assert paths.cert("auth").read_bytes() == old_auth
    assert pki.read_cert_info(paths.cert("audit")).not_after == NOW + timedelta(hours=24)
    assert pki.renew_due(paths, ["auth", "audit", "ratelimit"], NOW) == []


def test_status_lists_everything_sorted_by_expiry(paths: pki.PkiPaths) -> None:
    pki.issue(paths, "auth", now=NOW)
    pki.issue(paths, "audit", now=NOW, lifetime=timedelta(hours=2))
    (paths.dir / "broken.crt").write_text("garbage")
    infos = pki.status(paths)
    assert [i.name for i in infos] == ["audit", "auth", "intermediate-ca", "root-ca"]
    assert [i.spiffe_id for i in infos][:2] == [
        "spiffe://tradeguard.local/svc/audit",
        "spiffe://tradeguard.local/svc/auth",
    ]
    assert infos[3].spiffe_id is None
    assert infos[3].subject == "O=Tradeguard,CN=Tradeguard Root CA (tradeguard.local)"


def test_peer_spiffe_id_from_pem_edge_cases(paths: pki.PkiPaths) -> None:
    assert pki.peer_spiffe_id_from_pem(b"") is None
    assert pki.peer_spiffe_id_from_pem(b"junk") is None
    assert pki.peer_spiffe_id_from_pem(paths.root_cert.read_bytes()) is None  # no SAN
    two = forged_leaf(paths, ["spiffe://tradeguard.local/svc/a", "spiffe://tradeguard.local/svc/b"])
    assert pki.peer_spiffe_id_from_pem(two.public_bytes(serialization.Encoding.PEM)) is None


# --- gRPC (BoringSSL) over these certificates ---------------------------------------------------------------


@pytest.fixture
def echo_server(constrained: pki.PkiPaths) -> Iterator[tuple[int, list[dict[str, list[bytes]]]]]:
    """An mTLS gRPC server using the ``auth`` workload certificate; records each caller's auth context."""
    pki.issue(constrained, "auth")
    seen: list[dict[str, list[bytes]]] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = cast(Mapping[str, list[bytes]], context.auth_context())  # grpc-stubs say bytes; it is a list
        seen.append(dict(auth))
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ]
    )
    creds = grpc.ssl_server_credentials(
        [(constrained.key("auth").read_bytes(), constrained.cert("auth").read_bytes())],
        root_certificates=constrained.ca_bundle.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(None)


def _call(p: pki.PkiPaths, port: int, key_pem: bytes, chain_pem: bytes, target_name: str = "auth") -> bytes:
    creds = grpc.ssl_channel_credentials(p.ca_bundle.read_bytes(), key_pem, chain_pem)
    options = [("grpc.ssl_target_name_override", target_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        result: bytes = channel.unary_unary("/test.Echo/Echo", None, None)(b"ping", timeout=5)
        return result


def test_grpc_mtls_with_name_constrained_chain(
    constrained: pki.PkiPaths, echo_server: tuple[int, list[dict[str, list[bytes]]]]
) -> None:
    port, seen = echo_server
    pki.issue(constrained, "gateway")
    key, chain = constrained.key("gateway").read_bytes(), constrained.cert("gateway").read_bytes()
    assert _call(constrained, port, key, chain) == b"ping"
    assert seen[-1]["peer_spiffe_id"] == [b"spiffe://tradeguard.local/svc/gateway"]
    assert seen[-1]["ssl_tls_version"] == [b"TLSv1.3"]
    for other in ("gateway", "localhost", "127.0.0.1"):  # the server's certificate is for "auth" only
        with pytest.raises(grpc.RpcError) as err:
            _call(constrained, port, key, chain, other)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_enforces_the_uri_name_constraint(
    constrained: pki.PkiPaths, echo_server: tuple[int, list[dict[str, list[bytes]]]]
) -> None:
    port, seen = echo_server
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = private_pem(key)
    inter = constrained.intermediate_cert.read_bytes()
    inside = forged_leaf(constrained, ["spiffe://tradeguard.local/svc/x"], key)
    assert (
        _call(constrained, port, key_pem, inside.public_bytes(serialization.Encoding.PEM) + inter) == b"ping"
    )
    outside = forged_leaf(constrained, ["spiffe://evil.example/svc/x"], key)
    with pytest.raises(grpc.RpcError) as err:
        _call(constrained, port, key_pem, outside.public_bytes(serialization.Encoding.PEM) + inter)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(seen) == 1


# --- intermediate rotation ------------------------------------------------------------------------------------


def test_intermediate_due_after_half_its_life(tmp_path: Path) -> None:
    p = pki.PkiPaths(tmp_path / "home")
    pki.init_ca(p, now=NOW, intermediate_lifetime=timedelta(days=300), name_constraints=False)
    assert not pki.intermediate_due(p, NOW)
    assert not pki.intermediate_due(p, NOW + timedelta(days=149))
    assert pki.intermediate_due(p, NOW + timedelta(days=151))
    assert pki.intermediate_due(p, NOW + timedelta(days=400))  # expired: due, of course


def test_rotated_intermediate_old_leaves_stay_valid_and_become_due(paths: pki.PkiPaths) -> None:
    pki.issue(paths, "auth", now=NOW)
    old_leaf, old_intermediate = _chain(paths, "auth")
    old_key = paths.intermediate_key.read_bytes()
    expiry = pki.rotate_intermediate(paths, now=NOW + timedelta(hours=1), lifetime=timedelta(days=90))

    new_intermediate = x509.load_pem_x509_certificate(paths.intermediate_cert.read_bytes())
    assert new_intermediate.not_valid_after_utc == expiry == NOW + timedelta(hours=1, days=90)
    assert paths.intermediate_key.read_bytes() != old_key and _mode(paths.intermediate_key) == 0o600
    new_intermediate.verify_directly_issued_by(_root(paths))
    with pytest.raises(x509.ExtensionNotFound):  # as unconstrained as the one it replaced
        new_intermediate.extensions.get_extension_for_class(x509.NameConstraints)

    policy = PolicyBuilder().store(Store([_root(paths)])).time(NOW + timedelta(hours=2))
    policy.build_client_verifier().verify(old_leaf, [old_intermediate])  # still trusted: same root
    assert pki.needs_renewal(paths, "auth", NOW + timedelta(hours=2))  # but due: not under the current CA
    pki.renew_due(paths, ["auth"], NOW + timedelta(hours=2))
    leaf, intermediate = _chain(paths, "auth")
    assert intermediate == new_intermediate
    policy.build_client_verifier().verify(leaf, [intermediate])


def test_rotation_keeps_the_uri_name_constraint(constrained: pki.PkiPaths) -> None:
    pki.rotate_intermediate(constrained)
    rotated = x509.load_pem_x509_certificate(constrained.intermediate_cert.read_bytes())
    constraint = rotated.extensions.get_extension_for_class(x509.NameConstraints).value
    assert constraint.permitted_subtrees == [x509.UniformResourceIdentifier("tradeguard.local")]


def test_issue_refuses_an_intermediate_whose_key_does_not_match(paths: pki.PkiPaths) -> None:
    """What an interrupted rotation leaves (new key, old certificate) never signs a leaf."""
    stray = ec.generate_private_key(ec.SECP256R1())
    paths.intermediate_key.write_bytes(
        stray.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match=r"do not match.*rotate-intermediate"):
        pki.issue(paths, "auth", now=NOW)
    pki.rotate_intermediate(paths, now=NOW)
    pki.issue(paths, "auth", now=NOW)


def test_rotation_needs_the_root_key(paths: pki.PkiPaths) -> None:
    paths.root_key.unlink()
    with pytest.raises(OSError):
        pki.rotate_intermediate(paths, now=NOW)
    assert pki.issue(paths, "auth", now=NOW)  # the existing intermediate goes on signing


def test_an_intermediate_that_lasts_as_long_as_the_root_is_never_due(tmp_path: Path) -> None:
    """Near the root's end a new intermediate could not outlive the old one: no rotation loop."""
    p = pki.PkiPaths(tmp_path / "home")
    pki.init_ca(p, now=NOW, root_lifetime=timedelta(days=100), intermediate_lifetime=timedelta(days=365))
    assert not pki.intermediate_due(p, NOW + timedelta(days=90))
