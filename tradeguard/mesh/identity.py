"""Who is calling: the SPIFFE ID of the peer's verified client certificate."""

from __future__ import annotations

import functools
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

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
# server's context where this is never set, so a value here always belongs to the current call. Reading
# grpc's auth context builds a dict with the peer's PEM certificates (~3 µs): the interceptors and the
# servicer share one read.
_PEER: ContextVar[str | None] = ContextVar("tradeguard_peer_spiffe_id", default=None)


def peer_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The verified peer's SPIFFE ID as grpc reports it, or None (plaintext, or no URI SAN)."""
    cached = _PEER.get()
    if cached is not None:
        return cached
    values = list(context.auth_context().get("peer_spiffe_id", ()))
    if len(values) != 1:
        return None
    spiffe_id = bytes(values[0]).decode("ascii", errors="replace")
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
