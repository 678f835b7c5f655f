"""ChainInterceptor: several wrapping interceptors as one, in order, each method wrapped once."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tradeguard.rpc.handlers import ChainInterceptor, WrappingInterceptor, rebuild

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
    await channel.close()
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
