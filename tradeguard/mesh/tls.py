"""Mutual-TLS credentials for servers and channels, with certificate hot reload and a TLS 1.2 self-probe.

Servers use `grpc.dynamic_ssl_server_credentials`: grpc asks `CertificateReloader.fetch` before each
handshake, which returns a new configuration only when the files changed *and* the new key matches
the new certificate (a rotation writes the key first, then the certificate).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from tradeguard.mesh import handshake_log, pki
from tradeguard.observability.logging import get_logger

_log = get_logger("tradeguard.tls")


@dataclass(frozen=True)
class Workload:
    """The files of one workload identity: its certificate chain, its key and the CA bundle it trusts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of(cls, paths: pki.PkiPaths, name: str) -> Workload:
        return cls(cert=paths.cert(name), key=paths.key(name), ca=paths.ca_bundle)

    def stamp(self) -> tuple[int, ...]:
        """Changes whenever any of the three files is replaced."""
        out: list[int] = []
        for path in (self.cert, self.key, self.ca):
            st = os.stat(path)
            out += [st.st_mtime_ns, st.st_size, st.st_ino]
        return tuple(out)

    def read(self) -> tuple[bytes, bytes, bytes] | None:
        """(cert chain, key, ca) if the key matches the certificate, else None (a rotation in progress)."""
        cert, key, ca = self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        if not pki.key_pair_matches(cert, key):
            return None
        return cert, key, ca


class CertificateReloader:
    """Serves the current certificate to grpc's handshaker; picks up rotated files without a restart."""

    def __init__(self, workload: Workload) -> None:
        self._workload = workload
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self.reloads = 0
        first = workload.read()
        if first is None:
            raise ValueError(f"{workload.key} does not match {workload.cert}")
        self._stamp = workload.stamp()
        self.initial = _server_config(*first)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake; None keeps the current configuration."""
        try:
            with self._lock:
                stamp = self._workload.stamp()
                if stamp == self._stamp:
                    return None
                material = self._workload.read()
                if material is None:
                    return None  # key and certificate out of step: keep serving the old pair
                self._stamp = stamp
                self.reloads += 1
                return _server_config(*material)
        except OSError:
            return None  # a file briefly missing mid-rename: keep the old pair


def _server_config(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(workload: Workload) -> tuple[grpc.ServerCredentials, CertificateReloader]:
    """Credentials that require and verify a client certificate from our CA, reloading rotated files."""
    reloader = CertificateReloader(workload)
    # grpc's stubs omit it, but the fetcher may return None: "keep the current configuration"
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], reloader.fetch)
    creds = grpc.dynamic_ssl_server_credentials(reloader.initial, fetch, require_client_authentication=True)
    return creds, reloader


def channel_credentials(workload: Workload) -> grpc.ChannelCredentials:
    material = workload.read()
    if material is None:
        raise ValueError(f"{workload.key} does not match {workload.cert}")
    cert, key, ca = material
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class Tls12Accepted(RuntimeError):
    """The server completed a TLS 1.2 handshake: TLS 1.3-only enforcement is not in effect."""


def assert_tls12_refused(
    host: str, port: int, workload: Workload, timeout: float = 5.0, *, server_name: str = "localhost"
) -> None:
    """Connect as a TLS 1.2-only client presenting a valid client certificate; raise if it succeeds.

    Blocking: run it in a thread. A refused handshake (no shared cipher) is the expected outcome, logged as one
    `tls12_self_probe_refused` info event; with `handshake_log` installed, grpc core's own line about it is
    recognised and dropped, so a start reads as healthy.
    `server_name` is the SNI sent: the server's own name keeps grpc from logging an unknown-name error."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(workload.ca))
    ctx.load_cert_chain(certfile=str(workload.cert), keyfile=str(workload.key))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    with handshake_log.self_probe(), socket.create_connection((host, port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                version = tls.version()
        except (ssl.SSLError, ConnectionError) as refused:
            reason = getattr(refused, "reason", None) or type(refused).__name__
            _log.info("tls12_self_probe_refused", address=f"{host}:{port}", client_saw=reason)
            return
    raise Tls12Accepted(f"{host}:{port} accepted a {version} handshake")
