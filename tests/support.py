"""Helpers the tests share (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import socket
import subprocess

from tradeguard.mesh import pki


def free_port() -> int:
    """A loopback port free at the time of asking (for servers that a test starts as a process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl_handshake(port: int, paths: pki.PkiPaths, name: str, version: str) -> str:
    """`openssl s_client -<version>` (tls1_2 / tls1_3) presenting NAME's certificate; the combined output.

    A refused handshake exits non-zero; the caller reads the negotiated "Protocol version" (or its absence)."""
    cert, key, ca = str(paths.cert(name)), str(paths.key(name)), str(paths.ca_bundle)
    identity = ["-cert", cert, "-cert_chain", cert, "-key", key, "-CAfile", ca]
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", f"-{version}", *identity],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return out.stdout + out.stderr
