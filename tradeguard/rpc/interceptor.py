"""The server interceptor that turns exceptions into the rich error model (tradeguard.rpc.errors)."""

from __future__ import annotations

from typing import Any

import grpc

from tradeguard.errors import DomainError
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.errors import STATUS_DETAILS_KEY, to_rpc_status
from tradeguard.rpc.handlers import Context, WrappingInterceptor, wrap_handler

_log = get_logger("tradeguard.rpc")


async def abort_with(error: BaseException, context: Context) -> None:
    """Abort the call with the rich status of `error` (never returns normally)."""
    code, status, trailers = to_rpc_status(error)
    metadata: list[tuple[str, str | bytes]] = [(STATUS_DETAILS_KEY, status.SerializeToString())]
    metadata += trailers
    await context.abort(code, status.message, trailing_metadata=tuple(metadata))


async def _map_error(exc: BaseException, context: Context) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # already aborted with a status of its own
    if not isinstance(exc, DomainError):  # an opaque error's cause goes on the RPC's line (rpc.errors)
        _log.error("unhandled_exception", exc_info=exc)
    await abort_with(exc, context)


class ErrorInterceptor(WrappingInterceptor):
    """DomainError → its status with ErrorInfo and details; anything else → an opaque INTERNAL."""

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        return wrap_handler(handler, on_error=_map_error)
