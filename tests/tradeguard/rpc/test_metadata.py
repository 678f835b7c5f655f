"""A call's metadata is read from grpc once per call (tradeguard/rpc/metadata.py), and one call never sees
another's."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from tradeguard.rpc.metadata import call_metadata


class Context:
    """grpc.aio's ServicerContext as far as `call_metadata` uses it: counts its reads."""

    def __init__(self, *metadata: tuple[str, Any]) -> None:
        self.metadata = metadata
        self.reads = 0

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        self.reads += 1
        return self.metadata


def test_the_layers_of_one_call_share_one_read() -> None:
    context = Context(("authorization", "Bearer abc"), ("x-request-id", "r-1"))

    def call() -> None:
        assert call_metadata(context) == context.metadata
        assert call_metadata(context) is call_metadata(context)

    contextvars.copy_context().run(call)
    assert context.reads == 1


def test_none_is_no_metadata() -> None:
    class Empty(Context):
        def invocation_metadata(self) -> Any:
            self.reads += 1
            return None

    context = Empty()
    assert contextvars.copy_context().run(call_metadata, context) == ()


async def test_concurrent_calls_each_read_their_own() -> None:
    """Each RPC is a task of its own (its context a copy of the server's): a call's read never reaches another, and
    a context that is not this call's is read afresh even where an earlier call's entry is visible."""
    contexts = [Context(("x-request-id", f"r-{i}")) for i in range(20)]

    async def call(context: Context) -> Any:
        first = call_metadata(context)
        await asyncio.sleep(0)
        return first, call_metadata(context)

    results = await asyncio.gather(*(call(context) for context in contexts))
    for context, (first, again) in zip(contexts, results, strict=True):
        assert first == again == context.metadata and context.reads == 1

    def two_contexts_in_one_task() -> tuple[Any, Any]:
        return call_metadata(contexts[0]), call_metadata(contexts[1])

    assert contextvars.copy_context().run(two_contexts_in_one_task) == (
        contexts[0].metadata,
        contexts[1].metadata,
    )
