"""Who is calling: the SPIFFE ID of the peer's verified client certificate."""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

_SPIFFE_RE = re.compile(r"^spiffe://([a-z0-9.-]{1,253})/svc/([a-z][a-z0-9-]{0,62})$")


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId | None:
        match = _SPIFFE_RE.match(uri)
        return cls(match.group(1), match.group(2)) if match else None

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/svc/{self.name}"


def peer_spiffe_id(context: grpc.aio.ServicerContext[object, object]) -> str | None:
    """The verified peer's SPIFFE ID as grpc reports it, or None (plaintext, or no URI SAN)."""
    auth = context.auth_context()
    values = list(auth.get("peer_spiffe_id", ()))
    if len(values) != 1:
        return None
    return bytes(values[0]).decode("ascii", errors="replace")


def peer_identity(context: grpc.aio.ServicerContext[object, object], trust_domain: str) -> SpiffeId | None:
    """The peer's identity if it is a workload of our trust domain, else None."""
    raw = peer_spiffe_id(context)
    if raw is None:
        return None
    ident = SpiffeId.parse(raw)
    if ident is None or ident.trust_domain != trust_domain:
        return None
    return ident


def caller_name(context: grpc.aio.ServicerContext[object, object], trust_domain: str) -> str | None:
    """The calling workload's name ("ops", "auth", ...) or None when it is not one of ours."""
    ident = peer_identity(context, trust_domain)
    return ident.name if ident else None
