"""ChainInterceptor: several wrapping interceptors as one, in order, each method wrapped once; ChainedRegistration:
the generated registration served as one generic handler that hands the call's metadata over."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tradeguard.echo import ECHO, EchoServicer
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.rpc import metadata
from tradeguard.rpc.handlers import ChainedRegistration, ChainInterceptor, WrappingInterceptor, rebuild
from tradeguard.rpc.interceptor import ErrorInterceptor
from tradeguard.rpc.metadata import call_metadata
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


@contextlib.asynccontextmanager
async def serving(server: grpc.aio.Server) -> AsyncIterator[grpc.aio.Channel]:
    """`server` started on a loopback port, and a channel to it; both closed on exit."""
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close(None)
        await server.stop(0)


@pytest.fixture
async def chained() -> Any:
    layers = [Layer("outer"), Layer("middle"), Layer("inner")]
    server = grpc.aio.server(interceptors=[ChainInterceptor(layers)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})]
    )
    async with serving(server) as channel:
        yield channel, layers


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
    async with serving(server) as channel:
        yield channel


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


# --- ChainedRegistration: the generated registration served as one generic handler ---------------------------


class _MetadataEcho(EchoServicer):
    """Echo answers with the x-request-id the call's metadata carries, as the kit's readers get it and as grpc's
    context gives it, and whether the lookup had handed the metadata over to this very task."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        entry = metadata._READ.get()
        handed = entry is not None and entry[0] is asyncio.current_task()
        kit = dict(call_metadata(context)).get("x-request-id")
        await asyncio.sleep(0)  # let the other calls interleave
        grpc_own = dict(context.invocation_metadata() or ()).get("x-request-id")
        return echo_pb2.EchoResponse(text=f"{kit}|{grpc_own}|{handed}")


@pytest.fixture
async def registered() -> Any:
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(
        _MetadataEcho(), ChainedRegistration(server, ChainInterceptor([])).as_server()
    )
    async with serving(server) as channel:
        yield channel


async def test_each_concurrent_call_gets_its_own_metadata_handed_over_by_the_lookup(registered: Any) -> None:
    """grpc builds a call's metadata for handler lookup, in the call's own task; the kit's lookup hands it over
    to the call's readers, and among 50 concurrent calls each one sees its own."""
    ids = [f"req-{i}-x" for i in range(50)]
    stub = echo_pb2_grpc.EchoServiceStub(registered)
    replies = await asyncio.gather(
        *(
            stub.Echo(echo_pb2.EchoRequest(text="t"), metadata=(("x-request-id", rid),), timeout=10)
            for rid in ids
        )
    )
    assert [reply.text for reply in replies] == [f"{rid}|{rid}|True" for rid in ids]


async def test_an_unknown_method_of_a_chained_server_is_unimplemented(registered: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registered.unary_unary(f"/{ECHO}/Nope")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_method_registered_twice_is_refused() -> None:
    mounted = ChainedRegistration(grpc.aio.server(), ChainInterceptor([])).as_server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(_MetadataEcho(), mounted)
    with pytest.raises(ValueError, match=f"/{ECHO}/Echo is registered twice"):
        echo_pb2_grpc.add_EchoServiceServicer_to_server(_MetadataEcho(), mounted)
