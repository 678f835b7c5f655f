"""The kit's chain over real mutual TLS on the echo service: decoding after authorisation, undefined enum
values refused, request layers seeing the decoded request and the raw bytes, every call logged and counted."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tradeguard.echo import ECHO, EchoServicer, RunningEcho, running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.errors import PermissionDenied
from tradeguard.mesh import pki
from tradeguard.observability.logging import configure_logging
from tradeguard.rpc.handlers import Context, Layer, RequestCheck
from tradeguard.rpc.status import rich_status
from tradeguard.testing import eventually

ECHO_METHOD = f"/{ECHO}/Echo"
EXPAND_METHOD = f"/{ECHO}/Expand"
COLLECT_METHOD = f"/{ECHO}/Collect"
GARBAGE = b"\xff\xff\xff\xff not protobuf"


class Recorder(Layer):
    """Records what a request layer is given; refuses texts that start with "deny"."""

    def __init__(self, skip: str | None = None) -> None:
        self.seen: list[tuple[str, Any, bytes]] = []
        self.skip = skip

    def for_method(self, method: str) -> RequestCheck | None:
        if method == self.skip:
            return None

        async def check(context: Context, request: Any, raw: bytes) -> None:
            self.seen.append((method, request, raw))
            if request.text.startswith("deny"):
                raise PermissionDenied("refused by the layer", reason="LAYER_REFUSED")

        return check


@pytest.fixture
def log() -> io.StringIO:
    out = io.StringIO()
    configure_logging(json=True, stream=out, level="info")
    return out


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(skip=EXPAND_METHOD)


@pytest.fixture
async def echo(pki_paths: pki.PkiPaths, recorder: Recorder, log: io.StringIO) -> AsyncIterator[RunningEcho]:
    async with running_echo(pki_paths, layers=[recorder], tls12_self_probe=False) as running:
        yield running


def rpc_lines(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "rpc"]


async def settled(log: io.StringIO, count: int) -> list[dict[str, Any]]:
    await eventually(lambda: len(rpc_lines(log)) >= count)
    return rpc_lines(log)


def status_of(err: grpc.aio.AioRpcError) -> tuple[str | None, list[str]]:
    """(ErrorInfo reason, BadRequest field paths) of a rich status."""
    status = rich_status(err)
    assert status.details_problem is None
    return status.reason, [v.field for v in status.field_violations]


def count(echo: RunningEcho, method: str, code: str) -> float:
    labels = {"service": echo.name, "method": method, "code": code}
    return echo.server.registry.get_sample_value("tradeguard_rpc_requests_total", labels) or 0.0


async def raw_call(echo: RunningEcho, caller: str, body: bytes) -> grpc.aio.AioRpcError:
    async with echo.channel(caller) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(ECHO_METHOD)(body, timeout=5)
    return err.value


async def test_garbage_from_a_caller_not_allowed_is_permission_denied_logged_and_counted(
    echo: RunningEcho, recorder: Recorder, log: io.StringIO
) -> None:
    err = await raw_call(echo, "monitor", GARBAGE)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(err)[0] == "CALLER_NOT_ALLOWED"
    [line] = await settled(log, 1)
    assert (line["method"], line["code"]) == (ECHO_METHOD, "PERMISSION_DENIED")
    assert line["caller"].endswith("/svc/monitor")
    assert count(echo, ECHO_METHOD, "PERMISSION_DENIED") == 1
    assert recorder.seen == []  # the request layer runs after authorisation


async def test_garbage_from_an_allowed_caller_is_invalid_argument_logged_and_counted(
    echo: RunningEcho, recorder: Recorder, log: io.StringIO
) -> None:
    err = await raw_call(echo, "ops", GARBAGE)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DecodeError" not in (err.details() or "")
    assert status_of(err) == ("MALFORMED_REQUEST", ["request"])
    [line] = await settled(log, 1)
    assert (line["method"], line["code"], line["level"]) == (ECHO_METHOD, "INVALID_ARGUMENT", "warning")
    assert count(echo, ECHO_METHOD, "INVALID_ARGUMENT") == 1
    assert recorder.seen == []  # decoding failed first


async def test_undefined_enum_values_are_invalid_argument_naming_each_field(
    echo: RunningEcho, log: io.StringIO
) -> None:
    request = echo_pb2.EchoRequest(
        text="x",
        tone=7,  # type: ignore[arg-type]
        parts=[echo_pb2.Part(tone=echo_pb2.TONE_LOUD), echo_pb2.Part(tone=-3)],  # type: ignore[arg-type]
        tones={"ok": echo_pb2.TONE_PLAIN, "k": 9},  # type: ignore[dict-item]
        part=echo_pb2.Part(tone=3),  # type: ignore[arg-type]
        tone_list=[echo_pb2.TONE_PLAIN, 4],  # type: ignore[list-item]
        named_parts={"n": echo_pb2.Part(tone=5)},  # type: ignore[arg-type]
    )
    async with echo.channel("ops") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.stub(channel).Echo(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = status_of(err.value)
    assert reason == "UNDEFINED_ENUM_VALUE"
    assert sorted(fields) == sorted(
        ["tone", "parts[1].tone", 'tones["k"]', "part.tone", "tone_list[1]", 'named_parts["n"].tone']
    )
    [line] = await settled(log, 1)
    assert line["code"] == "INVALID_ARGUMENT"


async def test_defined_values_pass_and_the_layer_sees_the_wire_bytes(
    echo: RunningEcho, recorder: Recorder, log: io.StringIO
) -> None:
    # fields in reverse order: valid protobuf that a re-serialisation would not reproduce byte for byte
    wire = echo_pb2.EchoRequest(tone=echo_pb2.TONE_LOUD).SerializeToString()
    wire += echo_pb2.EchoRequest(text="hello").SerializeToString()
    decoded = echo_pb2.EchoRequest.FromString(wire)
    assert decoded.SerializeToString() != wire
    async with echo.channel("ops") as channel:
        reply = await channel.unary_unary(ECHO_METHOD)(wire, timeout=5)
    assert echo_pb2.EchoResponse.FromString(reply) == echo_pb2.EchoResponse(
        text="hello", tone=echo_pb2.TONE_LOUD
    )
    [(method, request, raw)] = recorder.seen
    assert method == ECHO_METHOD
    assert isinstance(request, echo_pb2.EchoRequest) and request == decoded
    assert raw == wire
    [line] = await settled(log, 1)
    assert line["code"] == "OK"


async def test_a_layer_refusal_is_mapped_to_its_status(echo: RunningEcho, log: io.StringIO) -> None:
    async with echo.channel("ops") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.stub(channel).Echo(echo_pb2.EchoRequest(text="deny me"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(err.value)[0] == "LAYER_REFUSED"
    [line] = await settled(log, 1)
    assert line["code"] == "PERMISSION_DENIED"


async def test_server_streaming_is_decoded_and_checked_and_a_layer_may_skip_a_method(
    echo: RunningEcho, recorder: Recorder
) -> None:
    async with echo.channel("ops") as channel:
        stub = echo.stub(channel)
        replies = [r async for r in stub.Expand(echo_pb2.ExpandRequest(text="a", count=3), timeout=5)]
        assert [(r.text, r.index) for r in replies] == [("a", 0), ("a", 1), ("a", 2)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in stub.Expand(echo_pb2.ExpandRequest(tone=8), timeout=5)]  # type: ignore[arg-type]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(err.value) == ("UNDEFINED_ENUM_VALUE", ["tone"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in channel.unary_stream(EXPAND_METHOD)(GARBAGE, timeout=5)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert recorder.seen == []  # the layer left Expand alone


async def test_client_streaming_decodes_and_checks_each_message(
    echo: RunningEcho, recorder: Recorder, log: io.StringIO
) -> None:
    messages = [echo_pb2.CollectRequest(text=t) for t in ("a", "b", "c")]

    async def requests(items: list[Any]) -> AsyncIterator[Any]:
        for item in items:
            yield item

    async with echo.channel("ops") as channel:
        stub = echo.stub(channel)
        reply = await stub.Collect(requests(messages), timeout=5)
        assert (reply.text, reply.count) == ("abc", 3)
        assert [raw for _, _, raw in recorder.seen] == [m.SerializeToString() for m in messages]
        bad = [echo_pb2.CollectRequest(text="a"), echo_pb2.CollectRequest(text="b", tone=6)]  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Collect(requests(bad), timeout=5)
        assert status_of(err.value) == ("UNDEFINED_ENUM_VALUE", ["tone"])
        raw_bodies = [echo_pb2.CollectRequest(text="a").SerializeToString(), GARBAGE]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.stream_unary(COLLECT_METHOD)(requests(raw_bodies), timeout=5)
        assert status_of(err.value) == ("MALFORMED_REQUEST", ["request"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Collect(requests([echo_pb2.CollectRequest(text="deny")]), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    lines = await settled(log, 4)
    assert [line["code"] for line in lines] == [
        "OK",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
    ]


async def test_a_checked_client_stream_with_no_message_is_refused_before_its_handler_runs(
    pki_paths: pki.PkiPaths, recorder: Recorder, log: io.StringIO
) -> None:
    """A layer checks each message; a stream that ends before its first message would reach the handler
    unchecked (for the guard: with no principal), so the chain refuses it and the handler never starts."""
    started: list[str] = []

    class Counting(EchoServicer):
        async def Collect(self, request_iterator: Any, context: Any) -> echo_pb2.CollectResponse:
            started.append("collect")
            return await super().Collect(request_iterator, context)

    async def nothing() -> AsyncIterator[echo_pb2.CollectRequest]:
        return
        yield  # an async generator that yields nothing

    serving = running_echo(pki_paths, layers=[recorder], servicer=Counting(), tls12_self_probe=False)
    async with serving as echo, echo.channel("ops") as channel:
        stub = echo.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Collect(nothing(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(err.value)[1] == ["request"]
        assert started == [] and recorder.seen == []
        reply = await stub.Collect(_one(echo_pb2.CollectRequest(text="x")), timeout=5)
        assert (reply.text, started) == ("x", ["collect"])


async def _one(item: echo_pb2.CollectRequest) -> AsyncIterator[echo_pb2.CollectRequest]:
    yield item
