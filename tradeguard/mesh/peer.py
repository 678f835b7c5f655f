"""Where a call comes from: the caller's IP address, from the connection or — for a call the HTTP edge forwards —
the client's address the edge saw.

- `peer_ip(peer)`: the address of a grpc peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`), canonical;
- `source_ip(context, trust_domain)`: the call's source address: the connection's, or from the edge's own workload
  (`spiffe://<trust domain>/svc/edge`) only, the client's address it forwards in `x-envoy-external-address`
  (which Envoy sets from the connection with `use_remote_address`); never believed from anyone else.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from tradeguard.mesh.identity import caller_name
from tradeguard.rpc.metadata import call_metadata

__all__ = ["EDGE", "FORWARDED_ADDRESS", "address_of", "peer_ip", "source_ip"]

EDGE = "edge"
FORWARDED_ADDRESS = "x-envoy-external-address"


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
        for key, value in call_metadata(context):
            if key == FORWARDED_ADDRESS:
                forwarded = address_of(str(value))
                if forwarded:
                    return forwarded
    return peer_ip(context.peer() or "")
