"""The dev/internal PKI: a root CA, an intermediate CA and short-lived workload certificates.

Layout under ``$TRADEGUARD_HOME/pki`` (directory mode 0700)::

    root-ca.crt / root-ca.key                  self-signed root (CA:TRUE, pathlen 1)
    intermediate-ca.crt / intermediate-ca.key  signs workload certificates (CA:TRUE, pathlen 0,
                                               name constraints: URIs only in the trust domain)
    ca.crt                                     the trust anchor every client and server verifies against
    trust-domain                               the SPIFFE trust domain, one line
    <name>.crt / <name>.key                    workload leaf followed by the intermediate / its key

and, for the Envoy edge (which must never see the CA keys), ``$TRADEGUARD_HOME/edge`` from
:func:`publish_bundle`: ``current`` -> a versioned directory holding only ``ca.crt``, ``edge.crt``, ``edge.key``.

Every key is ECDSA P-256, PEM PKCS#8, unencrypted (dev), created with mode 0600 from the first byte. Every
write is atomic (temporary file in the same directory, fsync, ``os.replace``). When issuing, the key is
written before the certificate, so a reader that catches the two mid-rotation sees a key that does not match
the certificate (see :func:`needs_renewal`) rather than a certificate whose key is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tradeguard.files import atomic_write

__all__ = [
    "EDGE",
    "NAME_RE",
    "CertInfo",
    "PkiPaths",
    "init_ca",
    "issue",
    "needs_renewal",
    "peer_spiffe_id_from_pem",
    "publish_bundle",
    "read_cert_info",
    "renew_due",
    "renewal_reason",
    "spiffe_id",
    "status",
    "trust_domain",
]

NAME_RE = r"^[a-z][a-z0-9-]{0,62}$"
_NAME = re.compile(NAME_RE)
# Lowercase DNS-like: labels of letters, digits and inner hyphens, separated by dots, 253 characters at most.
_TRUST_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)

ORGANIZATION = "Tradeguard"
CLOCK_SKEW = timedelta(minutes=5)
ROOT_NAME = "root-ca"
INTERMEDIATE_NAME = "intermediate-ca"
_BUNDLE_NAME = "ca"
# Names whose files belong to the CA itself; a workload may not take them.
RESERVED_NAMES = frozenset({ROOT_NAME, INTERMEDIATE_NAME, _BUNDLE_NAME})
EDGE = "edge"  # the Envoy edge's workload name: its files are published apart (see publish_bundle)
CURRENT = "current"  # the symlink a published bundle is read through

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


@dataclass(frozen=True)
class PkiPaths:
    """Where the PKI lives under ``$TRADEGUARD_HOME``."""

    home: Path

    @property
    def dir(self) -> Path:
        return self.home / "pki"

    @property
    def root_cert(self) -> Path:
        return self.dir / f"{ROOT_NAME}.crt"

    @property
    def root_key(self) -> Path:
        return self.dir / f"{ROOT_NAME}.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.dir / f"{INTERMEDIATE_NAME}.crt"

    @property
    def intermediate_key(self) -> Path:
        return self.dir / f"{INTERMEDIATE_NAME}.key"

    @property
    def ca_bundle(self) -> Path:
        return self.dir / f"{_BUNDLE_NAME}.crt"

    @property
    def trust_domain_file(self) -> Path:
        return self.dir / "trust-domain"

    def cert(self, name: str) -> Path:
        """The workload's certificate chain: its leaf followed by the intermediate."""
        return self.dir / f"{_check_name(name)}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{_check_name(name)}.key"

    @property
    def edge_dir(self) -> Path:
        """Where the edge's bundle is published (mounted into the Envoy container instead of ``dir``)."""
        return self.home / EDGE


@dataclass(frozen=True)
class CertInfo:
    name: str
    path: Path
    subject: str
    spiffe_id: str | None
    not_before: datetime
    not_after: datetime

    def remaining(self, now: datetime) -> timedelta:
        """Time left before expiry (negative once expired)."""
        return self.not_after - _utc(now)

    def expired(self, now: datetime) -> bool:
        return _utc(now) > self.not_after

    def past_half_life(self, now: datetime) -> bool:
        return _utc(now) >= self.not_before + (self.not_after - self.not_before) / 2


# --- names --------------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid workload name {name!r}: must match {NAME_RE}")
    if name in RESERVED_NAMES:
        raise ValueError(f"invalid workload name {name!r}: reserved for the CA's own files")
    return name


def _check_trust_domain(td: str) -> str:
    if not isinstance(td, str) or not _TRUST_DOMAIN.fullmatch(td):
        raise ValueError(
            f"invalid trust domain {td!r}: must be a lowercase DNS-like name (e.g. tradeguard.local)"
        )
    return td


def spiffe_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{_check_trust_domain(trust_domain)}/svc/{_check_name(name)}"


# --- time ---------------------------------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:  # naive datetimes are taken to be UTC
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


# --- files --------------------------------------------------------------------------------------------------


def _ensure_dir(paths: PkiPaths) -> None:
    paths.dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    os.chmod(paths.dir, _DIR_MODE)


@contextlib.contextmanager
def _locked(paths: PkiPaths) -> Iterator[None]:
    """Serialise writers (``init_ca`` and ``issue``) across processes."""
    _ensure_dir(paths)
    fd = os.open(paths.dir / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path, *, private_only: bool) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key; with ``private_only`` (CA keys), refuse a file group/other users may access."""
    with open(path, "rb") as f:
        if private_only:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077:
                raise PermissionError(
                    f"refusing to load CA key {path}: mode {mode:#o} lets group/other users access it "
                    f"(run: chmod 600 {path})"
                )
        data = f.read()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an ECDSA private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- certificate builders -----------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _serial() -> int:
    while True:  # 159 random bits: positive and within the 20 octets RFC 5280 allows
        serial = secrets.randbits(159)
        if serial:
            return serial


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _build_root(
    key: ec.EllipticCurvePrivateKey, td: str, now: datetime, lifetime: timedelta
) -> x509.Certificate:
    subject = _name(f"Tradeguard Root CA ({td})")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_intermediate(
    *,
    key: ec.EllipticCurvePrivateKey,
    root_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    td: str,
    now: datetime,
    lifetime: timedelta,
    name_constraints: bool,
) -> x509.Certificate:
    not_after = min(now + lifetime, root.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"Tradeguard Intermediate CA ({td})"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
    )
    if name_constraints:
        # Every URI the intermediate signs must name the trust domain as its host (RFC 5280 URI constraints
        # without a leading dot match the host exactly, so only spiffe://<td>/...). BoringSSL (gRPC) and
        # OpenSSL enforce this. DNS names and IP addresses stay unconstrained: leaves carry the bare workload
        # name as a DNS name, which no DNS subtree covers without listing every workload. cryptography's own
        # verifier (x509.verification) does not support URI constraints and rejects such chains.
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(td)], excluded_subtrees=None
        )
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(root_key, hashes.SHA256())


def _build_leaf(
    *,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    td: str,
    name: str,
    now: datetime,
    lifetime: timedelta,
) -> x509.Certificate:
    not_after = min(now + lifetime, ca.not_valid_after_utc)  # a leaf never outlives its issuer
    # The SPIFFE ID and the workload's own name only: no localhost or loopback addresses, which every
    # workload would share, so that a client naming the service it wants cannot be answered by another one.
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(spiffe_id(td, name)), x509.DNSName(name)]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


# --- public API ---------------------------------------------------------------------------------------------


def trust_domain(paths: PkiPaths) -> str:
    try:
        td = paths.trust_domain_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"PKI not initialised: {paths.trust_domain_file} is missing (run: tradeguard pki init)"
        ) from None
    return _check_trust_domain(td)


def init_ca(
    paths: PkiPaths,
    trust_domain: str = "tradeguard.local",
    *,
    now: datetime | None = None,
    root_lifetime: timedelta = timedelta(days=3650),
    intermediate_lifetime: timedelta = timedelta(days=365),
    name_constraints: bool = True,
) -> bool:
    """Create the root and intermediate CAs if absent (True); do nothing if both exist (False).

    An existing root is kept and only a missing intermediate is created. Raises ValueError when the PKI
    already exists for another trust domain. ``name_constraints=False`` leaves the intermediate's URI name
    constraint out (needed only by verifiers without URI-constraint support, such as cryptography's
    ``x509.verification``).
    """
    td = _check_trust_domain(trust_domain)
    at = _utc(now)
    if root_lifetime <= timedelta(0) or intermediate_lifetime <= timedelta(0):
        raise ValueError("CA lifetimes must be positive")
    with _locked(paths):
        root_exists = paths.root_cert.exists() and paths.root_key.exists()
        intermediate_exists = paths.intermediate_cert.exists() and paths.intermediate_key.exists()
        if root_exists and paths.trust_domain_file.exists():
            existing = _check_trust_domain(paths.trust_domain_file.read_text(encoding="ascii").strip())
            if existing != td:
                raise ValueError(
                    f"PKI in {paths.dir} already exists for trust domain {existing!r}, not {td!r}"
                )
        if root_exists and intermediate_exists and paths.ca_bundle.exists():
            return False

        if root_exists:
            root_key = _load_key(paths.root_key, private_only=True)
            root = _load_cert(paths.root_cert)
        else:
            root_key = _new_key()
            root = _build_root(root_key, td, at, root_lifetime)
            atomic_write(paths.root_key, _key_pem(root_key), _KEY_MODE)
            atomic_write(paths.root_cert, _cert_pem(root), _CERT_MODE)
            intermediate_exists = False  # a new root needs a new intermediate
        atomic_write(paths.ca_bundle, _cert_pem(root), _CERT_MODE)
        atomic_write(paths.trust_domain_file, f"{td}\n".encode("ascii"), _CERT_MODE)
        if not intermediate_exists:
            _write_intermediate(
                paths,
                root_key=root_key,
                root=root,
                td=td,
                now=at,
                lifetime=intermediate_lifetime,
                name_constraints=name_constraints,
            )
        return True


def _write_intermediate(
    paths: PkiPaths,
    *,
    root_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    td: str,
    now: datetime,
    lifetime: timedelta,
    name_constraints: bool,
) -> x509.Certificate:
    """A new intermediate key and certificate, written key first (callers hold the PKI lock)."""
    key = _new_key()
    intermediate = _build_intermediate(
        key=key,
        root_key=root_key,
        root=root,
        td=td,
        now=now,
        lifetime=lifetime,
        name_constraints=name_constraints,
    )
    atomic_write(paths.intermediate_key, _key_pem(key), _KEY_MODE)
    atomic_write(paths.intermediate_cert, _cert_pem(intermediate), _CERT_MODE)
    return intermediate


def intermediate_due(paths: PkiPaths, now: datetime | None = None) -> bool:
    """True when the intermediate CA is past half its life (or expired): the rule of the workload
    certificates, so that it is replaced long before any of them could be refused for it. False when it
    already lasts as long as the root: a new one could not outlive it (the root itself must be replaced)."""
    ca = _load_cert(paths.intermediate_cert)
    if ca.not_valid_after_utc >= _load_cert(paths.root_cert).not_valid_after_utc:
        return False
    return _info(ca, "intermediate-ca", paths.intermediate_cert).past_half_life(_utc(now))


def rotate_intermediate(
    paths: PkiPaths, *, now: datetime | None = None, lifetime: timedelta = timedelta(days=365)
) -> datetime:
    """Replace the intermediate CA with a new key and certificate signed by the root; return its expiry.

    Nothing is interrupted: the trust anchor (``ca.crt``) is the root, so workload certificates issued
    under the old intermediate (whose chain they carry) stay valid until they expire; :func:`needs_renewal`
    reports each of them as due at once, and the next renewal re-issues it under the new intermediate.
    The URI name constraint is kept if the old intermediate had it. Needs the root key.
    """
    if lifetime <= timedelta(0):
        raise ValueError("CA lifetimes must be positive")
    at = _utc(now)
    td = trust_domain(paths)
    with _locked(paths):
        root_key = _load_key(paths.root_key, private_only=True)
        root = _load_cert(paths.root_cert)
        if root.not_valid_after_utc <= at:
            raise ValueError(f"root CA {paths.root_cert} expired; a new PKI is needed (tradeguard pki init)")
        try:
            old = _load_cert(paths.intermediate_cert)
            old.extensions.get_extension_for_class(x509.NameConstraints)
            constrained = True
        except x509.ExtensionNotFound:
            constrained = False
        except (OSError, ValueError):
            constrained = True  # unreadable: the safe default
        intermediate = _write_intermediate(
            paths,
            root_key=root_key,
            root=root,
            td=td,
            now=at,
            lifetime=lifetime,
            name_constraints=constrained,
        )
    return intermediate.not_valid_after_utc


def issue(
    paths: PkiPaths,
    name: str,
    *,
    lifetime: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> CertInfo:
    """Issue (or re-issue) the workload certificate for ``name``, signed by the intermediate.

    Writes ``<name>.key`` first, then ``<name>.crt`` (the leaf followed by the intermediate).
    """
    _check_name(name)
    if lifetime <= timedelta(0):
        raise ValueError(f"certificate lifetime must be positive, not {lifetime}")
    at = _utc(now)
    td = trust_domain(paths)
    with _locked(paths):
        ca_key = _load_key(paths.intermediate_key, private_only=True)
        ca = _load_cert(paths.intermediate_cert)
        if ca.not_valid_after_utc <= at:
            raise ValueError(
                f"intermediate CA {paths.intermediate_cert} expired at "
                f"{ca.not_valid_after_utc:%Y-%m-%d %H:%M}Z; run: tradeguard pki rotate-intermediate"
            )
        if _spki(ca_key.public_key()) != _spki(ca.public_key()):
            raise ValueError(
                "the intermediate CA's key and certificate do not match (an interrupted rotation?); "
                "run: tradeguard pki rotate-intermediate"
            )
        key = _new_key()
        leaf = _build_leaf(key=key, ca_key=ca_key, ca=ca, td=td, name=name, now=at, lifetime=lifetime)
        atomic_write(paths.key(name), _key_pem(key), _KEY_MODE)
        atomic_write(paths.cert(name), _cert_pem(leaf) + _cert_pem(ca), _CERT_MODE)
    return _info(leaf, name, paths.cert(name))


def _spiffe_of(cert: x509.Certificate) -> str | None:
    """The certificate's single URI SAN when it is a SPIFFE ID; None when there is none or more than one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return None
    return uris[0]


def _info(cert: x509.Certificate, name: str, path: Path) -> CertInfo:
    return CertInfo(
        name=name,
        path=path,
        subject=cert.subject.rfc4514_string(),
        spiffe_id=_spiffe_of(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def read_cert_info(path: Path, name: str = "") -> CertInfo:
    """Describe the first certificate in a PEM file (``name`` defaults to the file's stem)."""
    return _info(_load_cert(path), name or path.stem, path)


def status(paths: PkiPaths) -> list[CertInfo]:
    """The root, the intermediate and every readable workload certificate, soonest expiry first."""
    infos: list[CertInfo] = []
    for ca_name, ca_path in ((ROOT_NAME, paths.root_cert), (INTERMEDIATE_NAME, paths.intermediate_cert)):
        if ca_path.exists():
            infos.append(read_cert_info(ca_path, ca_name))
    if paths.dir.is_dir():
        for path in sorted(paths.dir.glob("*.crt")):
            name = path.stem
            if name in RESERVED_NAMES or not _NAME.fullmatch(name):
                continue
            try:
                infos.append(read_cert_info(path, name))
            except (OSError, ValueError):
                continue  # unreadable: needs_renewal() reports it as due
    return sorted(infos, key=lambda i: (i.not_after, i.name))


def needs_renewal(paths: PkiPaths, name: str, now: datetime | None = None) -> bool:
    """True when the certificate or key is missing or unreadable, they do not match, the certificate was not
    signed by the current intermediate or is not for the current trust domain, or it is past half its life."""
    return renewal_reason(paths, name, now) is not None


def renewal_reason(paths: PkiPaths, name: str, now: datetime | None = None) -> str | None:
    """Why the workload certificate ``name`` is due for renewal (see :func:`needs_renewal`), or None when it
    is not: what ``tradeguard pki status`` shows, so that it never says ``ok`` for a certificate that the next
    renewal would replace (for example one issued by an intermediate that has since been rotated)."""
    at = _utc(now)
    try:
        cert = _load_cert(paths.cert(name))
        key = _load_key(paths.key(name), private_only=False)
    except (OSError, ValueError):
        return "missing or unreadable"
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return "key does not match"
    try:
        cert.verify_directly_issued_by(_load_cert(paths.intermediate_cert))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return "not issued by the current intermediate CA"
    try:
        if _spiffe_of(cert) != spiffe_id(trust_domain(paths), name):
            return "not for this trust domain"
    except (OSError, ValueError):
        return "not for this trust domain"
    info = _info(cert, name, paths.cert(name))
    if info.expired(at):
        return "expired"
    if info.past_half_life(at):
        return "past half its lifetime"
    return None


def renew_due(
    paths: PkiPaths,
    names: Iterable[str],
    now: datetime | None = None,
    *,
    lifetime: timedelta = timedelta(hours=24),
) -> list[str]:
    """Issue a new certificate for each name that :func:`needs_renewal`; return the names renewed."""
    renewed: list[str] = []
    for name in names:
        if needs_renewal(paths, name, now):
            issue(paths, name, lifetime=lifetime, now=now)
            renewed.append(name)
    return renewed


def peer_spiffe_id_from_pem(pem: bytes) -> str | None:
    """The one URI SAN (a SPIFFE ID) of the first certificate in ``pem``; None if absent, ambiguous or bad."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return _spiffe_of(cert)


def key_pair_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """True when the first certificate of ``cert_pem`` certifies the public half of ``key_pem``.

    A server reloading its files mid-rotation uses this to refuse a new key beside an old certificate."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    return _spki(key.public_key()) == _spki(cert.public_key())


def publish_bundle(paths: PkiPaths, name: str, directory: Path) -> bool:
    """Publish ``ca.crt``, ``<name>.crt`` and ``<name>.key`` into ``directory`` as one unit; True when a new
    version was published, False when the current one already holds exactly these files.

    For a reader that must not see the rest of the PKI (the internet-facing Envoy: no CA key) and that reloads
    whenever something is moved into ``directory`` (Envoy's SDS ``watched_directory``). The three files are
    written into a new versioned directory (``.v-<random>``), fsynced, and only then does one rename of the
    symlink ``directory/current`` make them current: a reader following ``current`` sees the old three files
    or the new three, never a key beside another certificate. All of it happens under the PKI lock (so never
    mid-issue, and two publishers never remove each other's version); the pair is checked to match. The
    previous version is kept (a reader may still be in it), older ones and leftovers of a crash are removed.
    """
    _check_name(name)
    with _locked(paths):
        files = {
            _BUNDLE_NAME + ".crt": (paths.ca_bundle.read_bytes(), _CERT_MODE),
            f"{name}.crt": (paths.cert(name).read_bytes(), _CERT_MODE),
            f"{name}.key": (paths.key(name).read_bytes(), _KEY_MODE),
        }
        if not key_pair_matches(files[f"{name}.crt"][0], files[f"{name}.key"][0]):
            raise ValueError(f"{paths.cert(name)} and {paths.key(name)} do not match: not published")
        directory.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        os.chmod(directory, _DIR_MODE)
        link = directory / CURRENT
        previous = Path(os.readlink(link)).name if link.is_symlink() else None
        if previous is not None and all(
            _read_or_none(directory / previous / file) == data for file, (data, _) in files.items()
        ):
            return False
        version = directory / f".v-{secrets.token_hex(8)}"
        version.mkdir(mode=_DIR_MODE)
        for file, (data, mode) in files.items():
            atomic_write(version / file, data, mode)
        staged = directory / f".{CURRENT}.{secrets.token_hex(8)}.tmp"
        os.symlink(version.name, staged)  # relative: the link works wherever the directory is mounted
        os.replace(staged, link)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in directory.glob(f".{CURRENT}.*.tmp"):
            old.unlink()
        for old in directory.glob(".v-*"):
            if old.name not in (version.name, previous):
                for stale in old.iterdir():
                    stale.unlink()
                old.rmdir()
    return True


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
