from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
import structlog.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tradeguard.observability.annotations import annotate
from tradeguard.observability.interceptor import TelemetryInterceptor, _millis, _RequestIds
from tradeguard.observability.logging import JsonLines, configure_logging, get_logger, json_lines
from tradeguard.observability.metrics import RpcMetrics
from tradeguard.observability.redact import REDACTED, Trusted
from tradeguard.testing import eventually

SERVICE = "test.Svc"
handler_log = get_logger("test.handler")


async def ok(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    handler_log.info("inside handler", size=len(request))
    return b"pong:" + request


async def annotated(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    # what a service core does: its audit fields go on the RPC's line (it may not override the line's own)
    assert annotate(resource="key/credentials", outcome="ok", method="/forged", code="FORGED")
    if request == b"fail":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    return b""


async def streamed_annotations(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    annotate(items=0)
    for i in range(2):
        annotate(items=i + 1)
        yield bytes([i])


async def invalid(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "quantity must be positive")
    raise AssertionError("unreachable")


async def boom(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("database said password=hunter2hunter2")


async def not_found(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("no such order")
    return b""


async def slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await asyncio.sleep(30)
    return b""


async def stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for i in range(3):
        handler_log.info("streaming", i=i)
        yield bytes([i])


async def writer_stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    for i in range(2):
        await context.write(bytes([i]))


async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    total = b""
    async for chunk in requests:
        total += chunk
    return total


async def bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for chunk in requests:
        yield chunk.upper()


def _generic_handler() -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ok": grpc.unary_unary_rpc_method_handler(ok),
            "Annotated": grpc.unary_unary_rpc_method_handler(annotated),
            "StreamedAnnotations": grpc.unary_stream_rpc_method_handler(streamed_annotations),
            "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
            "Boom": grpc.unary_unary_rpc_method_handler(boom),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "WriterStream": grpc.unary_stream_rpc_method_handler(writer_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


class Harness:
    def __init__(self) -> None:
        self.out = io.StringIO()
        self.registry = CollectorRegistry()
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        configure_logging(json=True, stream=self.out, level="debug")
        interceptor = TelemetryInterceptor("test", RpcMetrics("test", registry=self.registry))
        self.server = grpc.aio.server(interceptors=[interceptor])
        self.server.add_generic_rpc_handlers((_generic_handler(),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def stop(self) -> None:
        assert self.channel is not None and self.server is not None
        await self.channel.close(None)
        await self.server.stop(None)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines() if line]

    def rpc_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == "rpc"]

    async def settled_rpc_lines(self, count: int) -> list[dict[str, Any]]:
        """The rpc lines once `count` are written: a call's status can reach the client just before the
        server's interceptor has logged it (an aborting handler sends its status as it aborts)."""
        await eventually(lambda: len(self.rpc_lines()) >= count)
        return self.rpc_lines()

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, {"service": "test", **labels})
        return 0.0 if value is None else value


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.start()
    yield h
    await h.stop()


def _unary(h: Harness, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    assert h.channel is not None
    return h.channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None)


def _check_common(line: dict[str, Any], method: str) -> None:
    assert line["method"] == f"/{SERVICE}/{method}"
    assert isinstance(line["latency_ms"], float)
    assert line["latency_ms"] >= 0
    assert round(line["latency_ms"], 3) == line["latency_ms"]
    assert line["caller"] is None  # plaintext: no SPIFFE ID
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert line["logger"] == "tradeguard.rpc"
    assert set(line) >= {"method", "code", "latency_ms", "caller", "peer", "request_id", "level", "timestamp"}


async def test_ok_call_one_line_request_id_from_metadata(harness: Harness) -> None:
    response = await _unary(harness, "Ok")(b"ping", metadata=(("x-request-id", "req-42.A_b"),))
    assert response == b"pong:ping"
    [line] = await harness.settled_rpc_lines(1)
    _check_common(line, "Ok")
    assert line["code"] == "OK"
    assert line["level"] == "info"
    assert line["request_id"] == "req-42.A_b"
    # The handler's own line carries the request id and the method from the context variables ...
    [inner] = [entry for entry in harness.lines() if entry["event"] == "inside handler"]
    assert inner["request_id"] == "req-42.A_b"
    assert inner["method"] == f"/{SERVICE}/Ok"
    # ... and nothing leaks into the next call or out of the RPC.
    await _unary(harness, "Ok")(b"ping")
    second = (await harness.settled_rpc_lines(2))[1]
    assert second["request_id"] != "req-42.A_b"
    assert harness.sample("tradeguard_rpc_requests_total", method=f"/{SERVICE}/Ok", code="OK") == 2.0
    assert harness.sample("tradeguard_rpc_errors_total", method=f"/{SERVICE}/Ok", code="OK") == 0.0
    assert harness.sample("tradeguard_rpc_duration_seconds_count", method=f"/{SERVICE}/Ok") == 2.0


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "semi;colon", "", "ünï"])
async def test_invalid_request_id_is_replaced(harness: Harness, bad: str) -> None:
    metadata = (("x-request-id", bad),) if bad.isascii() else ()
    await _unary(harness, "Ok")(b"x", metadata=metadata)
    [line] = await harness.settled_rpc_lines(1)
    assert line["request_id"] != bad
    assert len(line["request_id"]) == 32
    int(line["request_id"], 16)


async def test_aborted_call(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _unary(harness, "Invalid")(b"x")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "quantity must be positive"
    [line] = await harness.settled_rpc_lines(1)
    _check_common(line, "Invalid")
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["level"] == "warning"
    assert "exception" not in line
    method = f"/{SERVICE}/Invalid"
    assert harness.sample("tradeguard_rpc_requests_total", method=method, code="INVALID_ARGUMENT") == 1.0
    assert harness.sample("tradeguard_rpc_errors_total", method=method, code="INVALID_ARGUMENT") == 1.0


async def test_set_code_without_raising(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _unary(harness, "NotFound")(b"x")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    [line] = await harness.settled_rpc_lines(1)
    assert line["code"] == "NOT_FOUND"
    assert line["level"] == "warning"


async def test_exception_in_handler(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _unary(harness, "Boom")(b"x")
    assert err.value.code() == grpc.StatusCode.UNKNOWN  # the exception went on to grpc unchanged
    [line] = await harness.settled_rpc_lines(1)
    _check_common(line, "Boom")
    assert line["code"] == "UNKNOWN"
    assert line["level"] == "error"
    assert "RuntimeError" in line["exception"]
    assert "hunter2hunter2" not in harness.out.getvalue()
    method = f"/{SERVICE}/Boom"
    assert harness.sample("tradeguard_rpc_errors_total", method=method, code="UNKNOWN") == 1.0


async def test_unary_stream(harness: Harness) -> None:
    assert harness.channel is not None
    call = harness.channel.unary_stream(
        f"/{SERVICE}/Stream", request_serializer=None, response_deserializer=None
    )(b"x", metadata=(("x-request-id", "s1"),))
    assert [msg async for msg in call] == [b"\x00", b"\x01", b"\x02"]
    [line] = await harness.settled_rpc_lines(1)
    _check_common(line, "Stream")
    assert line["code"] == "OK"
    assert line["request_id"] == "s1"
    inner = [entry for entry in harness.lines() if entry["event"] == "streaming"]
    assert [entry["request_id"] for entry in inner] == ["s1", "s1", "s1"]
    assert harness.sample("tradeguard_rpc_requests_total", method=f"/{SERVICE}/Stream", code="OK") == 1.0


async def test_unary_stream_writer_api(harness: Harness) -> None:
    assert harness.channel is not None
    call = harness.channel.unary_stream(
        f"/{SERVICE}/WriterStream", request_serializer=None, response_deserializer=None
    )(b"x")
    assert [msg async for msg in call] == [b"\x00", b"\x01"]
    [line] = await harness.settled_rpc_lines(1)
    assert line["code"] == "OK"


async def test_stream_unary_and_stream_stream(harness: Harness) -> None:
    assert harness.channel is not None

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"ab", b"cd"):
            yield chunk

    assert (
        await harness.channel.stream_unary(
            f"/{SERVICE}/ClientStream", request_serializer=None, response_deserializer=None
        )(chunks())
        == b"abcd"
    )
    bidi_call = harness.channel.stream_stream(
        f"/{SERVICE}/Bidi", request_serializer=None, response_deserializer=None
    )(chunks())
    assert [msg async for msg in bidi_call] == [b"AB", b"CD"]
    lines = await harness.settled_rpc_lines(2)
    assert [(line["method"], line["code"]) for line in lines] == [
        (f"/{SERVICE}/ClientStream", "OK"),
        (f"/{SERVICE}/Bidi", "OK"),
    ]


async def test_deadline_cancels_handler_and_logs_once(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _unary(harness, "Slow")(b"x", timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [line] = await harness.settled_rpc_lines(1)
    assert line["code"] == "CANCELLED"
    assert line["level"] == "warning"


async def test_unknown_method_is_not_logged(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _unary(harness, "Nope")(b"x")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert harness.rpc_lines() == []


async def test_many_concurrent_calls_keep_their_request_ids(harness: Harness) -> None:
    ids = [f"r{i}" for i in range(50)]
    await asyncio.gather(*(_unary(harness, "Ok")(b"x", metadata=(("x-request-id", rid),)) for rid in ids))
    assert sorted(line["request_id"] for line in await harness.settled_rpc_lines(50)) == sorted(ids)
    inner = [entry for entry in harness.lines() if entry["event"] == "inside handler"]
    assert sorted(entry["request_id"] for entry in inner) == sorted(ids)


async def test_explicit_logger_is_used() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    interceptor = TelemetryInterceptor(
        "test", RpcMetrics("test", registry=CollectorRegistry()), get_logger("custom")
    )
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((_generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary(f"/{SERVICE}/Ok", request_serializer=None, response_deserializer=None)(
                b"x"
            )
    finally:
        await server.stop(None)
    [line] = [json.loads(raw) for raw in out.getvalue().splitlines() if '"rpc"' in raw]
    assert line["logger"] == "custom"


async def test_annotations_go_on_the_rpc_line_and_never_override_it(harness: Harness) -> None:
    await _unary(harness, "Annotated")(b"x")
    with pytest.raises(grpc.aio.AioRpcError):
        await _unary(harness, "Annotated")(b"fail")
    await _unary(harness, "Ok")(b"x")
    first, failed, plain = await harness.settled_rpc_lines(3)
    assert (first["method"], first["code"]) == (f"/{SERVICE}/Annotated", "OK")
    assert (first["resource"], first["outcome"]) == ("key/credentials", "ok")
    assert (failed["code"], failed["resource"], failed["level"]) == (
        "PERMISSION_DENIED",
        "key/credentials",
        "warning",
    )
    assert "resource" not in plain  # nothing carried over from an earlier call
    assert len(harness.lines()) == 4  # the three rpc lines and the Ok handler's own line: no extra lines


async def test_streaming_annotations_and_none_outside_an_rpc(harness: Harness) -> None:
    assert harness.channel is not None
    assert [
        r
        async for r in harness.channel.unary_stream(
            f"/{SERVICE}/StreamedAnnotations", request_serializer=None, response_deserializer=None
        )(b"")
    ] == [
        b"\0",
        b"\1",
    ]
    [line] = await harness.settled_rpc_lines(1)
    assert line["items"] == 2
    assert annotate(resource="x") is False  # no RPC in progress here: the caller logs a line of its own


async def test_generated_request_ids_are_distinct(harness: Harness) -> None:
    for _ in range(5):
        await _unary(harness, "Ok")(b"x")
    ids = [line["request_id"] for line in await harness.settled_rpc_lines(5)]
    assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)


def test_request_ids_are_reseeded_as_a_forked_child_does() -> None:
    before = _RequestIds.next()
    _RequestIds.reseed()  # registered with os.register_at_fork(after_in_child=...)
    after = _RequestIds.next()  # not one the parent had made ready
    assert before[:16] != after[:16] and after[16:] == "0" * 16


def test_request_ids_made_in_batches_come_in_counter_order_and_never_repeat() -> None:
    _RequestIds.reseed()
    ids = [_RequestIds.next() for _ in range(3 * _RequestIds.BATCH + 5)]
    assert [int(i[16:], 16) for i in ids] == list(range(len(ids)))
    assert all(type(i) is Trusted and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_a_forked_child_makes_request_ids_of_its_own() -> None:
    """The real fork: the child's ids share nothing with the ids its parent had made ready."""
    _RequestIds.reseed()
    parent = _RequestIds.next()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, to the parent, and out
        os.write(write, _RequestIds.next().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child[:16] != parent[:16] and child[16:] == "0" * 16
    assert _RequestIds.next()[16:] == f"{1:016x}"  # the parent goes on with its own


async def test_a_caller_request_id_is_scanned_and_the_kit_own_fields_are_trusted(harness: Harness) -> None:
    card = "4111111111111111"  # a valid request id by its pattern, and a card number
    await _unary(harness, "Ok")(b"x", metadata=(("x-request-id", card),))
    await _unary(harness, "Ok")(b"x")
    caller_line, kit_line = await harness.settled_rpc_lines(2)
    assert caller_line["request_id"] == REDACTED  # what a caller sends is always scanned
    inner = [e["request_id"] for e in harness.lines() if e["event"] == "inside handler"]
    assert inner[0] == REDACTED  # the handler's own line carries it from the context variables, masked too
    assert card not in harness.out.getvalue()
    assert len(kit_line["request_id"]) == 32  # the generated id: the kit's own, passed through
    assert isinstance(_RequestIds.next(), Trusted)


# -- the rpc line's fast path (tradeguard.observability.logging.JsonLines) ----------------------------------


def test_the_fast_line_is_the_line_structlog_would_write() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out, level="debug")
    lines = json_lines()
    assert lines is not None
    token = structlog.contextvars.bind_contextvars(tenant="t-1", code="from-context")
    try:
        fields = {"resource": "password=hunter2hunter2", "code": Trusted("OK"), "request_id": VISA_ID}
        lines.write("info", {**fields, "logger": Trusted("tradeguard.rpc"), "event": Trusted("rpc")})
        get_logger("tradeguard.rpc").info("rpc", **fields)
    finally:
        structlog.contextvars.reset_contextvars(**token)
    fast, slow = (json.loads(line) for line in out.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fast["timestamp"])
    assert abs(_seconds(fast["timestamp"]) - _seconds(slow["timestamp"])) < 5
    del fast["timestamp"], slow["timestamp"]
    assert fast == slow
    assert fast["resource"] == "password=[REDACTED]" and fast["request_id"] == REDACTED
    assert (fast["tenant"], fast["code"]) == ("t-1", "OK")  # context variables under the event's own fields


@given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_latency_is_rendered_as_milliseconds_to_the_microsecond(seconds: float) -> None:
    rendered = _millis(seconds)
    assert re.fullmatch(r"\d+\.\d{3}", rendered)
    assert (
        abs(json.loads(rendered) - seconds * 1000.0) <= 0.0005 + seconds * 1e-9
    )  # half a microsecond, + float error


def test_the_fast_line_timestamp_is_utc_to_the_microsecond(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = JsonLines(io.StringIO(), min_level=20)
    at = dt.datetime(2026, 12, 1, 6, 7, 8, 123456, tzinfo=dt.UTC)
    for extra_ns in (0, 999, 1_000):  # nanoseconds below the microsecond are cut, as the float path cut them
        nanos = int(at.timestamp()) * 1_000_000_000 + 123_456_000 + extra_ns
        monkeypatch.setattr(time, "time_ns", lambda nanos=nanos: nanos)
        micros = "123457" if extra_ns == 1_000 else "123456"
        assert lines._timestamp() == f"2026-12-01T06:07:08.{micros}Z"
    nanos = (int(at.timestamp()) + 1) * 1_000_000_000  # the next second: the date and time formatted anew
    monkeypatch.setattr(time, "time_ns", lambda: nanos)
    assert lines._timestamp() == "2026-12-01T06:07:09.000000Z"


VISA_ID = "4111111111111111"


def _seconds(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_capture_logs_sees_the_rpc_line_while_it_is_installed(harness: Harness) -> None:
    with structlog.testing.capture_logs() as captured:
        assert json_lines() is None  # someone else's configuration: the line goes through structlog
        await _unary(harness, "Ok")(b"x")
        await eventually(lambda: any(entry["event"] == "rpc" for entry in captured))
    assert json_lines() is not None  # restored
    [entry] = [entry for entry in captured if entry["event"] == "rpc"]
    assert entry["code"] == "OK" and entry["method"] == f"/{SERVICE}/Ok"
    assert harness.rpc_lines() == []  # not written twice


async def test_the_configured_level_filters_rpc_lines() -> None:
    harness = Harness()
    await harness.start()
    try:
        configure_logging(json=True, stream=harness.out, level="warning")
        await _unary(harness, "Ok")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            await _unary(harness, "NotFound")(b"x")
        [line] = await harness.settled_rpc_lines(1)
        assert (line["code"], line["level"]) == ("NOT_FOUND", "warning")
        await _unary(harness, "Ok")(b"x")
        assert harness.sample("tradeguard_rpc_requests_total", method=f"/{SERVICE}/Ok", code="OK") == 2.0
        assert len(harness.rpc_lines()) == 1  # OK lines below the level, still counted
    finally:
        await harness.stop()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
    return dict(pairs)


async def test_the_rpc_line_has_each_key_once_and_the_kit_fields_win(harness: Harness) -> None:
    # the Annotated handler annotates method="/forged" and code="FORGED" besides its own fields
    await _unary(harness, "Annotated")(b"x", metadata=(("x-request-id", "caller-7"),))
    await _unary(harness, "Annotated")(b"x")
    await harness.settled_rpc_lines(2)
    raw = [line for line in harness.out.getvalue().splitlines() if '"event": "rpc"' in line]
    for line in (json.loads(text, object_pairs_hook=_no_duplicates) for text in raw):
        assert (line["method"], line["code"]) == (f"/{SERVICE}/Annotated", "OK")
        assert (line["resource"], line["level"], line["logger"]) == (
            "key/credentials",
            "info",
            "tradeguard.rpc",
        )
    assert [json.loads(text)["request_id"] == "caller-7" for text in raw] == [True, False]


_FRESH_PROCESS = r"""
import asyncio, io, json, sys
import grpc, structlog
from prometheus_client import CollectorRegistry
from tradeguard.observability.interceptor import TelemetryInterceptor
from tradeguard.observability.logging import _STRUCTLOG_VARS, configure_logging
from tradeguard.observability.metrics import RpcMetrics
from tradeguard.observability.annotations import annotate
from tradeguard.observability.redact import Trusted

class Context:
    def invocation_metadata(self): return ()
    def peer(self): return "ipv4:127.0.0.1:5"
    def peer_identity_key(self): return "x509_subject_alternative_name"
    def peer_identities(self): return [b"spiffe://t.test/svc/ops", b"ops"]
    def code(self): return None
    def cancelled(self): return False

async def plain(request, context): return request
async def binding(request, context):
    structlog.contextvars.bind_contextvars(tenant="t-9")
    return request
async def trusted(request, context):  # the kit's own values, as the guard annotates the verified principal
    annotate(user=Trusted("usr_4111111111111111"), key=None, auth=Trusted("jwt"))
    return request
async def trusted_under_a_secret_key(request, context):
    annotate(user=Trusted("usr_1"), token=Trusted("not-a-kit-word"))
    return request
async def mixed(request, context):
    annotate(user=Trusted("usr_1"), note="card 4111111111111111")
    return request

out = io.StringIO()
configure_logging(json=True, stream=out, level="info")
telemetry = TelemetryInterceptor("t", RpcMetrics("t", registry=CollectorRegistry()))
def wrapped(handler, name):
    return telemetry.wrap(grpc.unary_unary_rpc_method_handler(handler), f"/t.S/{name}").unary_unary
skipped = sorted(_STRUCTLOG_VARS)  # only the kit's two: the line's context merge is skipped
for handler, name in (
    (plain, "Plain"), (trusted, "Trusted"), (trusted_under_a_secret_key, "Secret"), (mixed, "Mixed"),
    (binding, "Binding"), (trusted, "Trusted"),
):
    asyncio.run(wrapped(handler, name)(b"x", Context()))
print(json.dumps({"vars": skipped, "lines": [json.loads(line) for line in out.getvalue().splitlines()]}))
"""


def test_the_line_without_a_context_merge_is_the_same_and_a_bound_variable_still_reaches_it() -> None:
    """In a process where no handler ever bound a structlog variable the fast line skips merging the context (the
    kit's own request id and method are written by the interceptor); once one did, it is merged again."""
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["vars"] == ["structlog_method", "structlog_request_id"]
    plain, trusted, secret, mixed, binding, trusted_bound = result["lines"]
    for line, method in ((plain, "/t.S/Plain"), (binding, "/t.S/Binding")):
        assert line["method"] == method and line["code"] == "OK" and line["event"] == "rpc"
        assert line["caller"] == "spiffe://t.test/svc/ops" and line["peer"] == "ipv4:127.0.0.1:5"
        assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])
    assert set(plain) == {
        "method",
        "code",
        "caller",
        "logger",
        "event",
        "latency_ms",
        "peer",
        "request_id",
        "level",
        "timestamp",
    }
    assert binding["tenant"] == "t-9"  # bound by the handler: merged from the context
    # Annotations that are all the kit's own (Trusted or None) are written as they are, with no redaction pass: the
    # same line as through redaction (once a handler has bound a variable, the context is merged again and such a
    # line goes through redaction: `trusted_bound`, the same call after `binding`)
    assert (trusted["user"], trusted["key"], trusted["auth"]) == ("usr_4111111111111111", None, "jwt")
    varying = ("timestamp", "latency_ms", "request_id")
    assert {k: v for k, v in trusted.items() if k not in varying} == {
        k: v for k, v in trusted_bound.items() if k not in varying
    }
    assert list(trusted) == list(trusted_bound)  # the same order too
    # ... but never under a key whose name makes it secret, and never beside a caller's text: redacted as ever
    assert (secret["user"], secret["token"]) == ("usr_1", REDACTED)
    assert mixed["user"] == "usr_1" and "4111111111111111" not in mixed["note"]
