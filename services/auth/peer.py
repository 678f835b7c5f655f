"""Who is on the other end of a call, as the auth service needs it: the source IP and the client certificate's
RFC 8705 thumbprint (`x5t#S256`, the base64url SHA-256 of the certificate's DER, for certificate-bound tokens).

- gRPC: the source address (the kit's tradeguard.mesh.peer: the connection's, or the client's address the HTTP
  edge forwards, believed from the edge only). The thumbprint of the verified peer certificate from the TLS auth
  context (`x509_pem_cert`).
- Envoy's Check: the PEM Envoy sends URL-encoded (`include_peer_certificate`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from tradeguard.guard.jwt import cert_thumbprint
from tradeguard.mesh.peer import EDGE, FORWARDED_ADDRESS, address_of, peer_ip, source_ip

__all__ = ["EDGE", "FORWARDED_ADDRESS", "address_of", "peer_ip", "peer_thumbprint", "source_ip", "x5t_s256"]


def x5t_s256(pem: str) -> str:
    """RFC 8705 §3.1: base64url (no padding) of the SHA-256 of the certificate's DER encoding (the kit's
    `cert_thumbprint`, which the guards compare tokens' `cnf` with)."""
    return cert_thumbprint(pem.strip())


def url_encoded_x5t_s256(encoded_pem: str) -> str | None:
    """The thumbprint of a URL-encoded PEM (as Envoy sends the peer certificate); None when there is none or it
    is not a certificate."""
    if not encoded_pem:
        return None
    try:
        return x5t_s256(unquote(encoded_pem))
    except (ValueError, TypeError):
        return None


def peer_thumbprint(context: Any) -> str | None:
    """The thumbprint of the peer's verified client certificate (the first `x509_pem_cert` of the auth
    context), or None."""
    values = list(context.auth_context().get("x509_pem_cert", ()))
    if not values:
        return None
    try:
        return x5t_s256(bytes(values[0]).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
