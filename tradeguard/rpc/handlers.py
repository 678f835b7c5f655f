"""Wrapping grpc.aio method handlers: one place that knows the four handler kinds.

Server interceptors in grpc.aio see no ServicerContext, so checks that need the peer (authorisation) or
the outcome (error mapping) wrap the handler that `continuation` returns. `wrap_handler` does that for
unary and streaming handlers alike, with a `before` hook (may abort) and an `on_error` hook (maps or
re-raises an exception).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
Before = Callable[[Context], Awaitable[None]]
OnError = Callable[[BaseException, Context], Awaitable[None]]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    before: Before | None = None,
    on_error: OnError | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind that runs `before`, then the behaviour; exceptions go to `on_error`
    (which must raise: it aborts the call or re-raises). Only async behaviours are supported."""

    async def failed(exc: BaseException, context: Context) -> None:
        if on_error is not None:
            await on_error(exc, context)
        raise exc

    # Per call, each layer is one coroutine frame: no awaiting of a hook that is not there.
    def unary(behavior: Callable[[Any, Context], Awaitable[Any]]) -> Callable[[Any, Context], Awaitable[Any]]:
        if before is None:

            async def run(request: Any, context: Context) -> Any:
                try:
                    return await behavior(request, context)
                except Exception as exc:
                    await failed(exc, context)

            return run

        check = before

        async def checked(request: Any, context: Context) -> Any:
            await check(context)
            try:
                return await behavior(request, context)
            except Exception as exc:
                await failed(exc, context)

        return checked

    def streaming(
        behavior: Callable[[Any, Context], AsyncIterator[Any]],
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            if before is not None:
                await before(context)
            try:
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:
                await failed(exc, context)

        return run

    return rebuild(handler, unary_response=unary, stream_response=streaming)


Behaviour = Callable[..., Any]


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary_response: Callable[[Behaviour], Behaviour],
    stream_response: Callable[[Behaviour], Behaviour],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and serializers whose behaviour is `unary_response(behaviour)` (unary-unary,
    stream-unary) or `stream_response(behaviour)` (unary-stream, stream-stream)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc's stubs type behaviours as sync callables; on a grpc.aio server they are coroutines/async generators
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(cast(Any, handler.unary_unary)), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(cast(Any, handler.stream_unary)), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream_response(cast(Any, handler.unary_stream)), **kwargs
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream_response(cast(Any, handler.stream_stream)), **kwargs
        )
    return handler


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A server interceptor that wraps each method's handler, built once per method: subclasses say how
    (`wrap`). grpc returns the same handler object for a method on every call, so closures and the handler
    tuple are not rebuilt per call (profiled: they showed)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        entry = self._cache.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self.wrap(handler, method)
        if len(self._cache) >= 4096:  # methods are few; a flood of names must not grow memory
            self._cache.clear()
        self._cache[method] = (handler, wrapped)
        return wrapped


class ChainInterceptor(WrappingInterceptor):
    """Several wrapping interceptors as ONE grpc interceptor, outermost first: grpc.aio awaits each
    interceptor's `intercept_service` on every call, so a chain of three cost three coroutines and
    continuations per call; composed, the wrapped handler is built once per method and the call pays one."""

    def __init__(self, layers: list[WrappingInterceptor]) -> None:
        super().__init__()
        self.layers = layers

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        for layer in reversed(self.layers):  # innermost wraps first
            handler = layer.wrap(handler, method)
        return handler
