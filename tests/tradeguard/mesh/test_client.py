"""The kit's client interceptor over real mutual TLS: request ids follow nested calls, calls get a deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import structlog

from tradeguard.mesh import pki, tls
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.client import CallDefaults, call_defaults_interceptors, current_request_id
from tradeguard.mesh.server import MeshServer, ServerConfig, Service
from tradeguard.testing import eventually

SERVICE = "tradeguard.probe.v1.Probe"


def _seen(context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """What the server saw: the caller's x-request-id (or null) and the call's remaining time (or null)."""
    sent = dict(context.invocation_metadata() or ()).get("x-request-id")
    remaining = context.time_remaining()
    return json.dumps({"request_id": sent, "remaining": remaining}).encode()


@dataclass
class Probe:
    port: int
    paths: pki.PkiPaths
    blocked: list[float | None] = field(default_factory=list)
    cancelled: int = 0

    def channel(self, caller: str = "ops", **options: Any) -> MeshChannel:
        return MeshChannel(
            f"127.0.0.1:{self.port}", "trading", tls.Workload.of(self.paths, caller), **options
        )


@pytest.fixture
async def probe(pki_paths: pki.PkiPaths) -> AsyncIterator[Probe]:
    state = Probe(port=0, paths=pki_paths)

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return _seen(context)

    async def relay(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        # a handler calling another service (here: this one, as the trading workload)
        async with state.channel("trading") as channel:
            nested = await channel.unary_unary(f"/{SERVICE}/Echo")(b"")
        return json.dumps({"own": current_request_id(), "nested": json.loads(nested)}).encode()

    async def block(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        state.blocked.append(context.time_remaining())
        try:
            await asyncio.Event().wait()  # until the deadline cancels the call
        except asyncio.CancelledError:
            state.cancelled += 1
            raise
        return b""

    async def echo_stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        yield _seen(context)

    async def collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        async for _ in requests:
            pass
        return _seen(context)

    async def chat(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield _seen(context)

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Relay": grpc.unary_unary_rpc_method_handler(relay),
        "Block": grpc.unary_unary_rpc_method_handler(block),
        "EchoStream": grpc.unary_stream_rpc_method_handler(echo_stream),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])

    policy = MethodPolicy("tradeguard.test", {f"/{SERVICE}/*": {"ops", "trading"}})
    config = ServerConfig(name="trading", port=0, home=pki_paths.home, grace_s=1.0)
    server = MeshServer(config, policy, [Service(SERVICE, register)])
    state.port = await server.start()
    try:
        yield state
    finally:
        await server.stop(grace=0, drain=0)


async def _requests() -> AsyncIterator[bytes]:
    yield b"one"


async def _all_kinds(channel: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """What the server saw on each of the four call kinds."""
    unary = await channel.unary_unary(f"/{SERVICE}/Echo")(b"", **kwargs)
    streamed = [item async for item in channel.unary_stream(f"/{SERVICE}/EchoStream")(b"", **kwargs)]
    collected = await channel.stream_unary(f"/{SERVICE}/Collect")(_requests(), **kwargs)
    chatted = [item async for item in channel.stream_stream(f"/{SERVICE}/Chat")(_requests(), **kwargs)]
    return [json.loads(raw) for raw in (unary, *streamed, collected, *chatted)]


async def test_a_handlers_request_id_goes_out_with_its_nested_calls(probe: Probe) -> None:
    async with probe.channel() as channel:
        answer = json.loads(await channel.unary_unary(f"/{SERVICE}/Relay")(b""))
        assert answer["own"] and answer["nested"]["request_id"] == answer["own"]
        # the caller's own id is adopted by the server, and so follows the nested call too
        answer = json.loads(
            await channel.unary_unary(f"/{SERVICE}/Relay")(b"", metadata=(("x-request-id", "order-42"),))
        )
        assert answer == {
            "own": "order-42",
            "nested": {"request_id": "order-42", "remaining": answer["nested"]["remaining"]},
        }


async def test_outside_a_handler_no_request_id_is_added(probe: Probe) -> None:
    assert current_request_id() is None
    async with probe.channel() as channel:
        seen = await _all_kinds(channel)
    assert [s["request_id"] for s in seen] == [None] * 4


async def test_a_bound_request_id_goes_out_on_all_four_kinds_and_an_explicit_one_wins(probe: Probe) -> None:
    async with probe.channel() as channel:
        with structlog.contextvars.bound_contextvars(request_id="abc-123"):
            seen = await _all_kinds(channel)
            assert [s["request_id"] for s in seen] == ["abc-123"] * 4
            explicit = await _all_kinds(channel, metadata=(("x-request-id", "mine"),))
            assert [s["request_id"] for s in explicit] == ["mine"] * 4
        with structlog.contextvars.bound_contextvars(request_id="not an id\n"):
            seen = await _all_kinds(channel)  # not an id the callee would accept: not sent
            assert [s["request_id"] for s in seen] == [None] * 4
        seen = await _all_kinds(channel)  # unbound again
        assert [s["request_id"] for s in seen] == [None] * 4


async def test_default_deadline_on_all_four_kinds_and_an_explicit_timeout_wins(probe: Probe) -> None:
    async with probe.channel(default_timeout_s=7.0) as channel:
        defaulted = await _all_kinds(channel)
        # grpc sends the deadline as a timeout rounded up: the server may see a few ms more than was set
        assert all(s["remaining"] is not None and 0 < s["remaining"] <= 7.5 for s in defaulted), defaulted
        explicit = await _all_kinds(channel, timeout=60.0)
        assert all(s["remaining"] is not None and 30.0 < s["remaining"] <= 60.5 for s in explicit), explicit
    async with probe.channel(default_timeout_s=None) as unbounded:
        assert [s["remaining"] for s in await _all_kinds(unbounded)] == [None] * 4


async def test_a_handler_that_blocks_is_cancelled_at_the_default_deadline(probe: Probe) -> None:
    async with probe.channel(default_timeout_s=1.0) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(f"/{SERVICE}/Block")(b"")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(probe.blocked) == 1 and probe.blocked[0] is not None and 0 < probe.blocked[0] <= 1.5
    await eventually(lambda: probe.cancelled == 1, within_s=30)


async def test_any_grpc_aio_channel_can_mount_the_interceptors(probe: Probe) -> None:
    creds = tls.channel_credentials(tls.Workload.of(probe.paths, "ops"))
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{probe.port}",
        creds,
        options=[("grpc.ssl_target_name_override", "trading")],
        interceptors=call_defaults_interceptors(default_timeout_s=5.0),
    ) as channel:
        with structlog.contextvars.bound_contextvars(request_id="firm-7"):
            seen = await _all_kinds(channel)
    assert [s["request_id"] for s in seen] == ["firm-7"] * 4
    assert all(s["remaining"] is not None and 0 < s["remaining"] <= 5.5 for s in seen), seen


def test_default_timeout_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="default_timeout_s"):
            CallDefaults(bad)


def test_the_callers_metadata_object_is_not_modified() -> None:
    metadata = grpc.aio.Metadata(("k", "v"))
    details = grpc.aio.ClientCallDetails("/a.B/C", None, metadata, None, None)
    with structlog.contextvars.bound_contextvars(request_id="r-1"):
        out = CallDefaults(5.0).details(details)
    assert list(metadata) == [("k", "v")]
    assert out.metadata is not None and list(out.metadata) == [("k", "v"), ("x-request-id", "r-1")]
    assert out.timeout == 5.0
