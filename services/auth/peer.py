"""Who is on the other end of a call, as the auth service needs it: the source IP and the client certificate's
RFC 8705 thumbprint (`x5t#S256`, the base64url SHA-256 of the certificate's DER, for certificate-bound tokens).

- gRPC: the address from `context.peer()` (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`); from the HTTP edge's own
  workload, the client's address it forwards (`x-envoy-external-address`, which Envoy sets from the connection
  with `use_remote_address`), never from anyone else. The thumbprint of the verified peer certificate from the
  TLS auth context (`x509_pem_cert`).
- Envoy's Check: the PEM Envoy sends URL-encoded (`include_peer_certificate`).
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import unquote

from tradeguard.guard.jwt import cert_thumbprint
from tradeguard.mesh.identity import caller_name

__all__ = ["EDGE", "FORWARDED_ADDRESS", "address_of", "peer_ip", "peer_thumbprint", "source_ip", "x5t_s256"]

EDGE = "edge"
FORWARDED_ADDRESS = "x-envoy-external-address"


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


def address_of(text: str) -> str:
    """`text` as a canonical IP address, or "" when it is none."""
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        return ""


def peer_ip(peer: str) -> str:
    """The address of a grpc peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`; "" for anything else)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return address_of(rest.rpartition(":")[0])
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return address_of(host.split("%", 1)[0].strip("[]"))
    return ""


def source_ip(context: Any, trust_domain: str) -> str:
    """The caller's address: the connection's, or for a call the HTTP edge forwards, the client's address the
    edge saw (only the edge's own workload is believed)."""
    if caller_name(context, trust_domain) == EDGE:
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_ADDRESS:
                forwarded = address_of(str(value))
                if forwarded:
                    return forwarded
    return peer_ip(context.peer() or "")
