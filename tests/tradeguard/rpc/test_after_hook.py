"""A layer's after-hook (`Layer.after_for_method`) on the kit's chain over real mutual TLS, on the echo service:
it sees each call's outcome before the response is released, can replace a success with an error, holds a
server stream's first message until it returns, and sees refusals by a request check too; methods without a hook
are untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tradeguard.echo import ECHO, RunningEcho, running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.errors import PermissionDenied, Unavailable
from tradeguard.mesh import pki
from tradeguard.rpc.handlers import After, Context, Layer, RequestCheck
from tradeguard.rpc.status import rich_status

ECHO_METHOD = f"/{ECHO}/Echo"
EXPAND_METHOD = f"/{ECHO}/Expand"
COLLECT_METHOD = f"/{ECHO}/Collect"


class Hooked(Layer):
    """Refuses texts starting with "deny" (a request check); after the handler records (method, error type,
    done) and replaces the outcome with UNAVAILABLE when told to; holds streams until `release` is set."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, bool]] = []
        self.replace = False
        self.release = asyncio.Event()
        self.release.set()

    def for_method(self, method: str) -> RequestCheck | None:
        async def check(context: Context, request: Any, raw: bytes) -> None:
            if getattr(request, "text", "").startswith("deny"):
                raise PermissionDenied("refused by the layer", reason="LAYER_REFUSED")

        return check

    def after_for_method(self, method: str) -> After | None:
        if method == COLLECT_METHOD:
            return None  # no hook: this method is built as before

        async def after(context: Context, error: BaseException | None, done: bool) -> None:
            if not done:
                await self.release.wait()
            self.seen.append((method, None if error is None else type(error).__name__, done))
            if done and self.replace and error is None:
                raise Unavailable("held back by the after-hook", reason="HELD_BACK")

        return after


@pytest.fixture
def hooked() -> Hooked:
    return Hooked()


@pytest.fixture
async def echo(pki_paths: pki.PkiPaths, hooked: Hooked) -> AsyncIterator[RunningEcho]:
    async with running_echo(pki_paths, layers=[hooked], tls12_self_probe=False) as running:
        yield running


async def test_the_hook_sees_a_unary_success_and_a_refusal_and_can_replace_the_outcome(
    echo: RunningEcho, hooked: Hooked
) -> None:
    async with echo.channel("ops") as channel:
        stub = echo.stub(channel)
        assert (await stub.Echo(echo_pb2.EchoRequest(text="hi"), timeout=10)).text == "hi"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Echo(echo_pb2.EchoRequest(text="deny me"), timeout=10)
        hooked.replace = True
        with pytest.raises(grpc.aio.AioRpcError) as replaced:
            await stub.Echo(echo_pb2.EchoRequest(text="held"), timeout=10)
    assert rich_status(refused.value).reason == "LAYER_REFUSED"
    assert (rich_status(replaced.value).code, rich_status(replaced.value).reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "HELD_BACK",
    )
    assert hooked.seen == [
        (ECHO_METHOD, None, True),
        (ECHO_METHOD, "PermissionDenied", True),
        (ECHO_METHOD, None, True),
    ]


async def test_a_server_stream_is_held_until_the_hook_returns_and_seen_when_it_ends(
    echo: RunningEcho, hooked: Hooked
) -> None:
    hooked.release.clear()
    async with echo.channel("ops") as channel:
        call = echo.stub(channel).Expand(echo_pb2.ExpandRequest(text="s", count=3), timeout=30)
        first = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({first}, timeout=0.5)  # a bounded look: nothing may arrive while held
        assert not done and hooked.seen == []
        hooked.release.set()
        messages = [await first] + [m async for m in call]
    assert [m.index for m in messages if isinstance(m, echo_pb2.ExpandResponse)] == [0, 1, 2]
    assert hooked.seen == [(EXPAND_METHOD, None, False), (EXPAND_METHOD, None, True)]


async def test_a_method_without_a_hook_is_untouched(echo: RunningEcho, hooked: Hooked) -> None:
    hooked.replace = True
    async with echo.channel("ops") as channel:
        reply = await echo.stub(channel).Collect(
            iter([echo_pb2.CollectRequest(text="a"), echo_pb2.CollectRequest(text="b")]), timeout=10
        )
    assert reply.text and hooked.seen == []
