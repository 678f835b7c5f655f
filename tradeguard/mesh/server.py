"""The server bootstrap every Tradeguard service uses.

One `MeshServer` = grpc.aio server on mutual TLS (client certificates required, TLS 1.3 only, hot-reloaded
certificates, bounded connection age) + health + reflection + the interceptor chain
(tracing as a grpc interceptor when spans are exported; telemetry → authorisation → error mapping → decoding
mounted on every handler at registration) + Prometheus metrics on loopback.
`stop()` shuts down gracefully: health goes NOT_SERVING, new calls are refused after the drain, in-flight calls
finish (up to `grace` seconds). Services are not started by hand: tradeguard.service runs them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer  # public as reflection.aio.ReflectionServicer
from prometheus_client import CollectorRegistry

from tradeguard import eventloop
from tradeguard.mesh import pki, tls
from tradeguard.mesh.authz import AuthzInterceptor, MethodPolicy
from tradeguard.observability import tracing
from tradeguard.observability.interceptor import TelemetryInterceptor
from tradeguard.observability.logging import get_logger
from tradeguard.observability.metrics import MetricsServer, RpcMetrics, start_metrics_server
from tradeguard.registry import env_prefix
from tradeguard.rpc.handlers import ChainedRegistration, ChainInterceptor, Layer, WrappingInterceptor
from tradeguard.rpc.interceptor import ErrorInterceptor
from tradeguard.settings import Env

_log = get_logger("tradeguard.server")

DEFAULT_HOME = Path(".tradeguard")


def home_from_env() -> Path:
    return Env("TRADEGUARD").path("HOME", DEFAULT_HOME).resolve()


#: How long a new connection may take to complete its TLS handshake before the server closes it (grpc's
#: default is 120 s: a connection that never starts TLS held a file descriptor and memory that long).
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServerConfig:
    """Settings every service shares, read once at start-up."""

    name: str
    port: int
    home: Path = field(default_factory=home_from_env)
    host: str = "127.0.0.1"
    metrics_port: int | None = None
    otlp_endpoint: str | None = None
    max_connection_age_s: float = 1800.0
    drain_s: float = 1.0
    grace_s: float = 10.0
    tls12_self_probe: bool = True
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    event_loop: eventloop.EventLoop = eventloop.DEFAULT

    def __post_init__(self) -> None:
        if not self.handshake_timeout_s > 0:
            raise ValueError(f"handshake_timeout_s must be positive, got {self.handshake_timeout_s}")

    @classmethod
    def from_env(
        cls, name: str, default_port: int, environ: MutableMapping[str, str] | None = None
    ) -> ServerConfig:
        """TRADEGUARD_HOME, TRADEGUARD_HOST, TRADEGUARD_<NAME>_PORT, TRADEGUARD_<NAME>_METRICS_PORT,
        TRADEGUARD_<NAME>_MAX_CONNECTION_AGE_S, TRADEGUARD_<NAME>_GRACE_S, TRADEGUARD_<NAME>_HANDSHAKE_TIMEOUT_S,
        TRADEGUARD_OTLP_ENDPOINT (tracing export is off unless it is set), TRADEGUARD_EVENT_LOOP
        (`tradeguard.eventloop`). Invalid values raise `SettingsError` naming the variable."""
        shared = Env("TRADEGUARD", environ)
        own = Env(env_prefix(name), environ)
        return cls(
            name=name,
            port=own.port("PORT", default_port),
            home=shared.path("HOME", DEFAULT_HOME).resolve(),
            host=shared.text("HOST", "127.0.0.1"),
            metrics_port=own.optional_port("METRICS_PORT"),
            otlp_endpoint=shared.optional_text("OTLP_ENDPOINT"),
            max_connection_age_s=own.number("MAX_CONNECTION_AGE_S", 1800.0, low=1.0, high=7 * 86400.0),
            grace_s=own.number("GRACE_S", 10.0, low=0.0, high=3600.0),
            handshake_timeout_s=own.number("HANDSHAKE_TIMEOUT_S", HANDSHAKE_TIMEOUT_S, low=0.1, high=120.0),
            event_loop=eventloop.from_env(environ),
        )

    @property
    def pki(self) -> pki.PkiPaths:
        return pki.PkiPaths(self.home)

    @property
    def workload(self) -> tls.Workload:
        return tls.Workload.of(self.pki, self.name)


@dataclass(frozen=True)
class Service:
    """A servicer to mount: its full proto name and the generated `add_…_to_server` call."""

    full_name: str
    register: Callable[[grpc.aio.Server], None]


def chain(
    service: str, metrics: RpcMetrics, policy: MethodPolicy | None, *, layers: Sequence[Layer] = ()
) -> ChainInterceptor:
    """The kit's chain, outermost first: telemetry → authorisation → error mapping → decoding → `layers`
    (a service's own request layers, which see the decoded request and its raw bytes) → the handler.
    `policy=None` only for plaintext benchmarks' baselines. Mount it with `mount` (no grpc interceptor per
    call), or as a grpc interceptor."""
    wrapping: list[WrappingInterceptor] = [TelemetryInterceptor(service, metrics)]
    if policy is not None:
        wrapping.append(AuthzInterceptor(policy))
    wrapping.append(ErrorInterceptor())
    return ChainInterceptor(wrapping, layers)


def mount(server: grpc.aio.Server, kit_chain: ChainInterceptor) -> grpc.aio.Server:
    """What the generated ``add_<Service>Servicer_to_server`` functions should be given instead of `server`:
    every handler they register goes through `kit_chain`, wrapped once per method."""
    return ChainedRegistration(server, kit_chain).as_server()


def server_interceptors(traced: bool) -> list[Any]:
    """The grpc interceptors left: OpenTelemetry's, only when spans are exported (`traced`) — profiled, it was
    about a third of the server's per-call CPU while producing spans nobody receives."""
    return [*tracing.server_interceptors()] if traced else []


class MeshServer:
    """A service's grpc.aio server on the mesh. `layers`: the service's own request layers
    (`tradeguard.rpc.handlers.Layer`), run after authorisation and decoding, in order. The config's
    `handshake_timeout_s` bounds the TLS handshake of every new connection."""

    def __init__(
        self,
        config: ServerConfig,
        policy: MethodPolicy,
        services: Sequence[Service],
        *,
        layers: Sequence[Layer] = (),
    ) -> None:
        self.config = config
        self.policy = policy
        self.services = list(services)
        self.layers = list(layers)
        self.registry = CollectorRegistry()
        self.metrics = RpcMetrics(config.name, registry=self.registry)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.reloader: tls.CertificateReloader | None = None
        self.metrics_server: MetricsServer | None = None  # Prometheus on loopback, plain HTTP
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.draining = False  # health says NOT_SERVING; new calls are refused once the drain is over

    async def start(self) -> int:
        cfg = self.config
        age_ms = int(cfg.max_connection_age_s * 1000)
        server = grpc.aio.server(
            interceptors=server_interceptors(cfg.otlp_endpoint is not None),
            options=[
                ("grpc.server_handshake_timeout_ms", max(1, round(cfg.handshake_timeout_s * 1000))),
                ("grpc.max_connection_age_ms", age_ms),
                ("grpc.max_connection_age_grace_ms", int(cfg.grace_s * 1000)),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        mounted = mount(server, chain(cfg.name, self.metrics, self.policy, layers=self.layers))
        for svc in self.services:
            svc.register(mounted)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, mounted)
        names = [svc.full_name for svc in self.services]
        # reflection's enable_server_reflection picks its servicer by the server's type: the aio one by hand
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer([*names, health.SERVICE_NAME, reflection.SERVICE_NAME]), mounted
        )
        creds, self.reloader = tls.server_credentials(cfg.workload)
        self.port = server.add_secure_port(f"{cfg.host}:{cfg.port}", creds)
        await server.start()
        self._server = server
        if cfg.tls12_self_probe:
            try:
                await asyncio.to_thread(
                    tls.assert_tls12_refused, cfg.host, self.port, cfg.workload, server_name=cfg.name
                )
            except tls.Tls12Accepted:
                await server.stop(0)
                _log.error("tls12_accepted_refusing_to_serve", port=self.port)
                raise
        if cfg.metrics_port is not None:
            self.metrics_server = start_metrics_server(cfg.metrics_port, registry=self.registry)
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _log.info(
            "serving",
            service=cfg.name,
            address=f"{cfg.host}:{self.port}",
            metrics_port=cfg.metrics_port,
            event_loop=eventloop.running(),
        )
        return self.port

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Health NOT_SERVING and keep serving for `drain` seconds (so load balancers and health-checking
        clients move away), then refuse new calls, let in-flight calls finish (up to `grace`), stop."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.draining = True
        drain = self.config.drain_s if drain is None else drain
        if drain > 0:
            await asyncio.sleep(drain)
        await self._server.stop(self.config.grace_s if grace is None else grace)
        self._server = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        _log.info("stopped", service=self.config.name)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
