"""A call's metadata is read from grpc once per call (tradeguard/rpc/metadata.py), and one call never sees
another's; what the kit's handler lookup hands over is taken only by the first reader in the lookup's own task."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from tradeguard.rpc.metadata import call_metadata, hand_over


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


async def test_handed_over_metadata_is_taken_by_the_first_reader_in_the_same_task_without_reading_grpc() -> (
    None
):
    context = Context(("x-request-id", "r-context"))
    handed = (("x-request-id", "r-lookup"),)

    async def call() -> tuple[Any, Any]:
        hand_over(handed)
        return call_metadata(context), call_metadata(context)

    first, again = await asyncio.create_task(call())
    assert first is handed and again is handed
    assert context.reads == 0


async def test_handed_over_metadata_is_bound_to_the_first_context_that_takes_it() -> None:
    """Once taken, the entry is that context's: another context in the same task is read from grpc."""
    first, second = Context(("x-request-id", "r-1")), Context(("x-request-id", "r-2"))
    handed = (("x-request-id", "r-1"),)

    async def call() -> tuple[Any, Any]:
        hand_over(handed)
        return call_metadata(first), call_metadata(second)

    assert await asyncio.create_task(call()) == (handed, second.metadata)
    assert (first.reads, second.reads) == (0, 1)


async def test_a_task_started_by_the_handler_reads_its_metadata_from_grpc() -> None:
    """A task the handler starts copies the call's context: the handed-over entry is visible there but owned by
    the lookup's task, so the new task reads the metadata from the context it is given."""
    context = Context(("x-request-id", "r-context"))

    async def read(ctx: Context) -> Any:
        return call_metadata(ctx)

    async def call() -> Any:
        hand_over((("x-request-id", "r-lookup"),))
        return await asyncio.create_task(read(context))

    assert await asyncio.create_task(call()) == context.metadata
    assert context.reads == 1


async def test_concurrent_lookups_each_hand_over_to_their_own_call() -> None:
    contexts = [Context(("x-request-id", f"r-{i}")) for i in range(20)]

    async def call(context: Context) -> Any:
        hand_over(context.metadata)  # what grpc built for this call's lookup
        await asyncio.sleep(0)
        return call_metadata(context)

    results = await asyncio.gather(*(asyncio.create_task(call(context)) for context in contexts))
    assert results == [context.metadata for context in contexts]
    assert all(context.reads == 0 for context in contexts)


def test_hand_over_outside_a_running_loop_changes_nothing() -> None:
    """A synchronous handler's thread has no task: nothing is handed over, the context is read."""
    context = Context(("x-request-id", "r-context"))

    def call() -> Any:
        hand_over((("x-request-id", "r-lookup"),))
        return call_metadata(context)

    assert contextvars.copy_context().run(call) == context.metadata
    assert context.reads == 1
