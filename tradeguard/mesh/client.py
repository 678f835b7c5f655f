"""The kit's client interceptor: the caller's request id goes out with nested calls, and no call is unbounded.

While a server handler runs, the kit's telemetry layer binds the RPC's `request_id` in structlog's context
variables (tradeguard.observability.interceptor). When that handler calls another service, the same id goes
out as `x-request-id` metadata, so the callee logs its line under the caller's id and one id follows a request
through the mesh. Outside a handler (no id bound) nothing is added, and an `x-request-id` the caller set itself
is kept.

A call without a timeout gets `default_timeout_s` (a grpc call without a deadline waits forever on a stuck
backend, holding its caller's task and memory); a timeout the caller passes always wins.

All four call kinds; `MeshChannel` mounts it on every channel it opens. Any grpc.aio channel can use it too:

    grpc.aio.secure_channel(target, creds, interceptors=call_defaults_interceptors(default_timeout_s=5.0))
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, Literal, cast, overload

import grpc
from grpc.aio import ClientCallDetails, Metadata

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "REQUEST_ID_HEADER",
    "CallDefaults",
    "call_defaults_interceptors",
    "current_request_id",
    "details_interceptors",
]

DEFAULT_TIMEOUT_S: Final = 10.0
REQUEST_ID_HEADER: Final = "x-request-id"
# What the server side accepts from a caller (tradeguard.observability.interceptor); anything else stays home.
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VAR_NAME: Final = "structlog_request_id"  # structlog keeps each bound key in a ContextVar of this name


class _RequestIdVar:
    """The ContextVar structlog binds `request_id` into, found once (structlog creates one per key and keeps it)."""

    var: contextvars.ContextVar[Any] | None = None

    @classmethod
    def get(cls) -> Any:
        var = cls.var
        if var is None:
            for candidate in contextvars.copy_context():
                if candidate.name == _VAR_NAME:
                    cls.var = var = candidate
                    break
            else:
                return None  # nothing was ever bound in this context: no request id
        return var.get(None)


def current_request_id() -> str | None:
    """The request id bound for the server call running in this context, if any (and well formed)."""
    value = _RequestIdVar.get()
    if isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value):
        return value
    return None  # unbound (None), cleared (Ellipsis) or not an id the callee would accept


def _has_key(metadata: Iterable[tuple[str, Any]], key: str) -> bool:
    return any(k.lower() == key for k, _ in metadata)


class CallDefaults:
    """Forwards the current request id as `x-request-id` and sets `default_timeout_s` when the caller set
    no timeout (`None`: calls without a timeout stay unbounded). `interceptors()` mounts it on a channel."""

    def __init__(self, default_timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        if default_timeout_s is not None and not 0 < default_timeout_s < math.inf:
            raise ValueError(
                f"default_timeout_s must be positive and finite, or None, got {default_timeout_s}"
            )
        self.default_timeout_s = default_timeout_s

    def details(self, details: ClientCallDetails) -> ClientCallDetails:
        """The call's details with the defaults applied (the caller's own values win)."""
        timeout = details.timeout if details.timeout is not None else self.default_timeout_s
        metadata = details.metadata
        request_id = current_request_id()
        if request_id is not None and (metadata is None or not _has_key(metadata, REQUEST_ID_HEADER)):
            # a fresh Metadata: the caller's object is never modified
            metadata = Metadata(*(metadata or ()), (REQUEST_ID_HEADER, request_id))
        if timeout is details.timeout and metadata is details.metadata:
            return details
        return ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """The four interceptors (one per call kind) that apply these defaults to every call."""
        return details_interceptors(self.details, with_first_request=False)


def call_defaults_interceptors(
    default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> list[grpc.aio.ClientInterceptor]:
    """The kit's client interceptors for any grpc.aio channel (all four call kinds)."""
    return CallDefaults(default_timeout_s).interceptors()


DetailsRewrite = Callable[[ClientCallDetails], ClientCallDetails]
"""Rewrites a call's details (metadata, timeout, ...) before the call starts."""
FirstRequestRewrite = Callable[[ClientCallDetails, Sequence[Any]], ClientCallDetails]
"""Rewrites a call's details given its first request message: a one-item sequence, or an empty one for a
client stream that ends before its first message."""


@overload
def details_interceptors(
    rewrite: DetailsRewrite, *, with_first_request: Literal[False]
) -> list[grpc.aio.ClientInterceptor]: ...
@overload
def details_interceptors(
    rewrite: FirstRequestRewrite, *, with_first_request: Literal[True]
) -> list[grpc.aio.ClientInterceptor]: ...
def details_interceptors(
    rewrite: DetailsRewrite | FirstRequestRewrite, *, with_first_request: bool
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for all four call kinds that only rewrite each call's ClientCallDetails with `rewrite`.

    `with_first_request=False`: `rewrite(details)`, requests pass through untouched. `with_first_request=True`:
    `rewrite(details, first)` where `first` is `(request,)` for a unary request, and for a client stream its first
    message, read before the call starts (`[]` if the stream is empty; the call then gets every message, first
    included, from an async iterator).

    One interceptor per call kind: grpc.aio files an interceptor object under the first kind it is an
    instance of, so a single object subclassing all four would intercept unary-unary calls only."""
    kit: _Plain | _WithFirst
    if with_first_request:
        kit = _WithFirst(cast(FirstRequestRewrite, rewrite))
    else:
        kit = _Plain(cast(DetailsRewrite, rewrite))
    kinds: list[Any] = [_UnaryUnary(kit), _UnaryStream(kit), _StreamUnary(kit), _StreamStream(kit)]
    return kinds


async def _first_then_rest(
    requests: AsyncIterable[Any] | Iterable[Any],
) -> tuple[list[Any], AsyncIterator[Any]]:
    """The first message (or none) and an iterator of all messages, first included."""
    if isinstance(requests, AsyncIterable):
        iterator = aiter(requests)
        try:
            first = [await anext(iterator)]
        except StopAsyncIteration:
            first = []

        async def chained_async() -> AsyncIterator[Any]:
            for item in first:
                yield item
            async for item in iterator:
                yield item

        return first, chained_async()
    sync_iterator = iter(requests)
    head = [item for item, _ in zip(sync_iterator, range(1), strict=False)]

    async def chained() -> AsyncIterator[Any]:
        for item in head:
            yield item
        for item in sync_iterator:
            yield item

    return head, chained()


_Requests = AsyncIterable[Any] | Iterable[Any]


class _Plain:
    """Details rewritten alone; requests untouched."""

    def __init__(self, rewrite: DetailsRewrite) -> None:
        self._rewrite = rewrite

    def unary(self, details: ClientCallDetails, request: Any) -> ClientCallDetails:
        return self._rewrite(details)

    async def stream(
        self, details: ClientCallDetails, requests: _Requests
    ) -> tuple[ClientCallDetails, _Requests]:
        return self._rewrite(details), requests


class _WithFirst:
    """Details rewritten from the first request (a client stream's first message read ahead)."""

    def __init__(self, rewrite: FirstRequestRewrite) -> None:
        self._rewrite = rewrite

    def unary(self, details: ClientCallDetails, request: Any) -> ClientCallDetails:
        return self._rewrite(details, (request,))

    async def stream(
        self, details: ClientCallDetails, requests: _Requests
    ) -> tuple[ClientCallDetails, _Requests]:
        first, rest = await _first_then_rest(requests)
        return self._rewrite(details, first), rest


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, kit: _Plain | _WithFirst) -> None:
        self._unary = kit.unary

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._unary(client_call_details, request), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, kit: _Plain | _WithFirst) -> None:
        self._unary = kit.unary

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._unary(client_call_details, request), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, kit: _Plain | _WithFirst) -> None:
        self._stream = kit.stream

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: _Requests,
    ) -> Any:
        return await continuation(*await self._stream(client_call_details, request_iterator))


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, kit: _Plain | _WithFirst) -> None:
        self._stream = kit.stream

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: _Requests,
    ) -> Any:
        return await continuation(*await self._stream(client_call_details, request_iterator))
