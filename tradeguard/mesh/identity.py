"""Who is calling: the SPIFFE ID of the peer's verified client certificate."""

from __future__ import annotations

import functools
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import grpc

_SPIFFE_RE = re.compile(r"^spiffe://([a-z0-9.-]{1,253})/svc/([a-z][a-z0-9-]{0,62})$")


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId | None:
        return _parse(uri)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/svc/{self.name}"


@functools.lru_cache(maxsize=1024)  # peers are the few workloads our CA issued for: parse each once
def _parse(uri: str) -> SpiffeId | None:
    match = _SPIFFE_RE.fullmatch(uri)
    return SpiffeId(match.group(1), match.group(2)) if match else None


# The peer of the RPC this task serves. grpc.aio runs each RPC in its own task, which starts from a copy of the
# server's context where this is never set, so a value here always belongs to the current call: the interceptors
# and the servicer share one read.
_PEER: ContextVar[str | None] = ContextVar("tradeguard_peer_spiffe_id", default=None)
_SAN: Final = "x509_subject_alternative_name"
_SPIFFE_PREFIX: Final = b"spiffe://"


def peer_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The verified peer's SPIFFE ID, or None (plaintext, or not exactly one ``spiffe://`` subject alternative
    name).

    Read from grpc's peer identities, the certificate's subject alternative names (a third of a microsecond),
    rather than its whole auth context, which copies the peer's PEM certificate and chain into a dict per call
    (10-15 µs on a real call). A SAN that starts with ``spiffe://`` can only be a URI SAN; like grpc's own
    ``peer_spiffe_id`` property, a certificate with two of them names nobody, and a certificate without SANs
    (whose identity grpc takes from the common name) names nobody either."""
    cached = _PEER.get()
    if cached is not None:
        return cached
    if context.peer_identity_key() != _SAN:
        return None
    found: bytes | None = None
    for value in context.peer_identities() or ():
        if value.startswith(_SPIFFE_PREFIX):
            if found is not None:
                return None
            found = value
    if found is None:
        return None
    spiffe_id = found.decode("ascii", errors="replace")
    _PEER.set(spiffe_id)
    return spiffe_id


def peer_identity(context: grpc.aio.ServicerContext[Any, Any], trust_domain: str) -> SpiffeId | None:
    """The peer's identity if it is a workload of our trust domain, else None."""
    raw = peer_spiffe_id(context)
    if raw is None:
        return None
    ident = SpiffeId.parse(raw)
    if ident is None or ident.trust_domain != trust_domain:
        return None
    return ident


def caller_name(context: grpc.aio.ServicerContext[Any, Any], trust_domain: str) -> str | None:
    """The calling workload's name ("ops", "auth", ...) or None when it is not one of ours."""
    ident = peer_identity(context, trust_domain)
    return ident.name if ident else None
