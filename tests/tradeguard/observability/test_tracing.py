from __future__ import annotations

import io
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from tradeguard.observability.interceptor import TelemetryInterceptor
from tradeguard.observability.logging import configure_logging
from tradeguard.observability.metrics import RpcMetrics
from tradeguard.observability.tracing import client_interceptors, server_interceptors


async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    raise AssertionError("unreachable")


async def test_aio_interceptors_produce_linked_spans() -> None:
    configure_logging(json=True, stream=io.StringIO())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    telemetry = TelemetryInterceptor("test", RpcMetrics("test", registry=CollectorRegistry()))
    server = grpc.aio.server(interceptors=[*server_interceptors(provider), telemetry])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Trace",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=client_interceptors(provider)
        ) as channel:
            assert (
                await channel.unary_unary(
                    "/test.Trace/Echo", request_serializer=None, response_deserializer=None
                )(b"hi")
                == b"hi"
            )
            try:
                await channel.unary_unary(
                    "/test.Trace/Fail", request_serializer=None, response_deserializer=None
                )(b"hi")
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            else:
                raise AssertionError("expected PERMISSION_DENIED")
    finally:
        await server.stop(None)

    spans = exporter.get_finished_spans()
    by_kind = {(span.kind, span.name): span for span in spans}
    server_span = by_kind[(SpanKind.SERVER, "/test.Trace/Echo")]
    client_span = by_kind[(SpanKind.CLIENT, "/test.Trace/Echo")]
    # The client interceptor propagated the trace context to the server.
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    failed = by_kind[(SpanKind.SERVER, "/test.Trace/Fail")]
    # Semantic conventions: the code is recorded; PERMISSION_DENIED is not a server-side span error.
    assert failed.attributes is not None
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert failed.status.status_code == StatusCode.UNSET


def test_configure_tracing_without_endpoint_installs_provider() -> None:
    from opentelemetry import trace

    from tradeguard.observability.tracing import configure_tracing

    configure_tracing("tradeguard-test")
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "tradeguard-test"
