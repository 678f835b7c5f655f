"""The error interceptor: domain errors keep their code and details, anything else is an opaque INTERNAL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tradeguard.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from tradeguard.rpc.interceptor import ErrorInterceptor
from tradeguard.rpc.status import rich_status

SECRET = "hunter2-super-secret-value"


async def _raise(request: bytes, context: object) -> bytes:
    kind = request.decode()
    if kind == "internal":
        raise RuntimeError(f"db password={SECRET} at /var/lib/x.py line 3")
    if kind == "invalid":
        raise InvalidArgument.field("symbol", "must look like BTC-USD")
    if kind == "limited":
        raise ResourceExhausted("key:abc", "10 requests per second", 1.2)
    if kind == "unauth":
        raise Unauthenticated(cause=f"bad signature for secret {SECRET}")
    return b"ok"


async def _stream(request: bytes, context: object) -> AsyncIterator[bytes]:
    yield b"first"
    raise RuntimeError(SECRET)


@pytest.fixture
async def target() -> AsyncIterator[str]:
    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(_raise),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def _call(target: str, kind: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/t.T/Call", request_serializer=None, response_deserializer=None)(
                kind.encode(), timeout=5
            )
    return err.value


async def test_unknown_exception_is_opaque_internal(target: str) -> None:
    err = await _call(target, "internal")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"
    assert SECRET not in str(err) and "x.py" not in str(err)
    assert rich_status(err).reason == "INTERNAL"


async def test_streaming_failure_is_mapped_too(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream("/t.T/Stream", request_serializer=None, response_deserializer=None)(
            b"", timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [item async for item in call]
    assert err.value.code() == grpc.StatusCode.INTERNAL and SECRET not in str(err.value)


async def test_invalid_argument_has_bad_request(target: str) -> None:
    err = await _call(target, "invalid")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_status(err).field_violations[0].field == "symbol"


async def test_rate_limit_has_retry_info_quota_failure_and_retry_after(target: str) -> None:
    err = await _call(target, "limited")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # grpc-stubs types RpcError's trailers as _Metadatum objects; an AioRpcError's are grpc.aio.Metadata,
    # a collection of (key, value) tuples
    trailers: dict[str, str | bytes] = dict(err.trailing_metadata() or ())  # type: ignore[arg-type]
    assert trailers["retry-after"] == "2"
    status = rich_status(err)
    assert status.retry_after_s == 2
    assert status.retry_delay_s == 1.2
    assert status.quota_violations[0].subject == "key:abc"


async def test_unauthenticated_is_one_opaque_message(target: str) -> None:
    err = await _call(target, "unauth")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "authentication failed"
    assert SECRET not in str(err)
