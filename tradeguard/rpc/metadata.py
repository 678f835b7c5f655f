"""A call's invocation metadata, read from grpc once per call.

grpc.aio builds the metadata anew on every `context.invocation_metadata()` (every key and value decoded; a bearer
token alone is most of a kilobyte), and several layers of one call read it: the telemetry layer (the request id),
the guard (the credentials), the peer helpers (the edge's forwarded address). `call_metadata(context)` reads it
the first time and keeps it in a context variable with the context it belongs to, so the call's later readers
get the same tuple. Each RPC runs in its own task whose context starts from the server's, and the entry is
compared with the call's context by identity: one call never sees another's.

grpc has already built that tuple once per call, for handler lookup (`HandlerCallDetails.invocation_metadata`).
The kit's lookup hands it over (`hand_over`) instead of letting the first reader build it again: the entry is then
owned by the task the lookup ran in, and only the first reader in that same task takes it (it becomes that
reader's context's); anywhere else (a task the handler started, a grpc that looked the call up in another task)
the metadata is read from the context as before.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, TypeAlias

__all__ = ["Metadata", "call_metadata", "hand_over"]

Metadata: TypeAlias = "tuple[tuple[str, Any], ...]"

# (owner, metadata): the owner is the call's context, or the task whose handler lookup handed the metadata over
_READ: ContextVar[tuple[object, Metadata] | None] = ContextVar("tradeguard_call_metadata", default=None)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop (a synchronous handler in grpc's executor thread)
        return None


def hand_over(metadata: Metadata) -> None:
    """Give the call's metadata, as grpc built it for handler lookup, to the call's first `call_metadata` reader
    in this same task (see the module)."""
    task = _current_task()
    if task is not None:
        _READ.set((task, metadata))


def call_metadata(context: Any) -> Metadata:
    """`context.invocation_metadata()` of this call (empty when it has none), read once per call."""
    read = _READ.get()
    if read is not None:
        owner = read[0]
        if owner is context:
            return read[1]
        if owner is _current_task():  # handed over by this task's lookup, not yet taken
            _READ.set((context, read[1]))
            return read[1]
    metadata: Metadata = tuple(context.invocation_metadata() or ())
    _READ.set((context, metadata))
    return metadata
