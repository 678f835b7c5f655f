"""A call's invocation metadata, read from grpc once per call.

grpc.aio builds the metadata anew on every `context.invocation_metadata()` (every key and value decoded; a bearer
token alone is most of a kilobyte), and several layers of one call read it: the telemetry layer (the request id),
the guard (the credentials), the peer helpers (the edge's forwarded address). `call_metadata(context)` reads it
the first time and keeps it in a context variable with the context it belongs to, so the call's later readers
get the same tuple. Each RPC runs in its own task whose context starts from the server's, and the entry is
compared with the call's context by identity: one call never sees another's.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, TypeAlias

__all__ = ["Metadata", "call_metadata"]

Metadata: TypeAlias = "tuple[tuple[str, Any], ...]"

_READ: ContextVar[tuple[object, Metadata] | None] = ContextVar("tradeguard_call_metadata", default=None)


def call_metadata(context: Any) -> Metadata:
    """`context.invocation_metadata()` of this call (empty when it has none), read once per call."""
    read = _READ.get()
    if read is not None and read[0] is context:
        return read[1]
    metadata: Metadata = tuple(context.invocation_metadata() or ())
    _READ.set((context, metadata))
    return metadata
