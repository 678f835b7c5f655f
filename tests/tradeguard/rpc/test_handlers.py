"""ChainInterceptor: several wrapping interceptors as one, in order, each method wrapped once."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tradeguard.echo.v1 import echo_pb2
from tradeguard.rpc.handlers import ChainInterceptor, WrappingInterceptor, rebuild
from tradeguard.rpc.interceptor import ErrorInterceptor
from tradeguard.rpc.status import rich_status

TRACE: list[str] = []


class Layer(WrappingInterceptor):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.wraps = 0

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        self.wraps += 1

        def unary(behavior: Any) -> Any:
            async def run(request: Any, context: Any) -> Any:
                TRACE.append(f"{self.name}>")
                try:
                    return await behavior(request, context)
                finally:
                    TRACE.append(f"<{self.name}")

            return run

        return rebuild(handler, unary_response=unary, stream_response=lambda b: b)


async def _echo(request: bytes, context: Any) -> bytes:
    TRACE.append("handler")
    return request


@pytest.fixture
async def chained() -> Any:
    layers = [Layer("outer"), Layer("middle"), Layer("inner")]
    server = grpc.aio.server(interceptors=[ChainInterceptor(layers)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel, layers
    await channel.close(None)
    await server.stop(0)


async def test_layers_run_outermost_first_and_wrap_each_method_once(chained: Any) -> None:
    channel, layers = chained
    TRACE.clear()
    echo = channel.unary_unary("/t.Echo/Echo")
    for _ in range(3):
        assert await echo(b"x", timeout=5) == b"x"
    assert TRACE == ["outer>", "middle>", "inner>", "handler", "<inner", "<middle", "<outer"] * 3
    assert [layer.wraps for layer in layers] == [1, 1, 1]


async def test_unknown_method_is_unimplemented_and_not_wrapped(chained: Any) -> None:
    channel, layers = chained
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/t.Echo/Nope")(b"x", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert [layer.wraps for layer in layers] == [0, 0, 0]


# -- the chain's decode step on the call kinds the echo service does not have ----------------------------------


async def _bidi(requests: Any, context: Any) -> Any:
    async for request in requests:
        yield echo_pb2.CollectResponse(text=request.text.upper(), count=1)


async def _writer(request: echo_pb2.ExpandRequest, context: Any) -> None:
    for index in range(request.count):
        await context.write(echo_pb2.ExpandResponse(text=request.text, index=index))


@pytest.fixture
async def decoding_server() -> Any:
    handlers = {
        "Bidi": grpc.stream_stream_rpc_method_handler(
            _bidi,
            request_deserializer=echo_pb2.CollectRequest.FromString,
            response_serializer=echo_pb2.CollectResponse.SerializeToString,
        ),
        "Writer": grpc.unary_stream_rpc_method_handler(
            _writer,
            request_deserializer=echo_pb2.ExpandRequest.FromString,
            response_serializer=echo_pb2.ExpandResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server(interceptors=[ChainInterceptor([ErrorInterceptor()])])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Kinds", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close(None)
    await server.stop(0)


async def _bodies(*bodies: bytes) -> Any:
    for body in bodies:
        yield body


async def test_bidi_requests_are_decoded_each_and_a_bad_one_is_invalid_argument(decoding_server: Any) -> None:
    bidi = decoding_server.stream_stream("/t.Kinds/Bidi")
    good = [echo_pb2.CollectRequest(text=t).SerializeToString() for t in ("a", "b")]
    replies = [echo_pb2.CollectResponse.FromString(r) async for r in bidi(_bodies(*good), timeout=5)]
    assert [r.text for r in replies] == ["A", "B"]
    bad = echo_pb2.CollectRequest(text="c", tone=5).SerializeToString()  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [r async for r in bidi(_bodies(good[0], bad), timeout=5)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_status(err.value).reason == "UNDEFINED_ENUM_VALUE"


async def test_a_streaming_handler_that_writes_with_context_write_is_decoded_too(
    decoding_server: Any,
) -> None:
    writer = decoding_server.unary_stream("/t.Kinds/Writer")
    body = echo_pb2.ExpandRequest(text="w", count=2).SerializeToString()
    replies = [echo_pb2.ExpandResponse.FromString(r) async for r in writer(body, timeout=5)]
    assert [(r.text, r.index) for r in replies] == [("w", 0), ("w", 1)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [r async for r in writer(b"\xff\xff", timeout=5)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
