"""OpenTelemetry tracing: a TracerProvider per process and the grpc.aio interceptors that make spans."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as _otel_grpc
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = ["client_interceptors", "configure_tracing", "enabled", "server_interceptors"]

# The instrumentation package is untyped.
_aio_server_interceptor = cast(Callable[..., Any], _otel_grpc.aio_server_interceptor)
_aio_client_interceptors = cast(Callable[..., Any], _otel_grpc.aio_client_interceptors)


def configure_tracing(service_name: str, otlp_endpoint: str | None = None) -> None:
    """Install the global TracerProvider (``service.name`` = ``service_name``).

    Spans are exported only when ``otlp_endpoint`` is given, over TLS (``insecure=False``), batched off the
    request path. OpenTelemetry allows the global provider to be set once per process; later calls are ignored
    by the API (with a warning).
    """
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=False))
        )
    trace.set_tracer_provider(provider)
    global _exporting  # noqa: PLW0603 - one provider per process
    _exporting = bool(otlp_endpoint)


_exporting = False


def enabled() -> bool:
    """Whether spans are exported from this process (so that making them is worth the CPU)."""
    return _exporting


def server_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """OpenTelemetry's grpc.aio server interceptor (one SERVER span per RPC); global provider by default."""
    return [
        cast("grpc.aio.ServerInterceptor[Any, Any]", _aio_server_interceptor(tracer_provider=tracer_provider))
    ]


def client_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's grpc.aio client interceptors (all four call kinds; propagate the trace context)."""
    return cast("list[grpc.aio.ClientInterceptor]", _aio_client_interceptors(tracer_provider=tracer_provider))
