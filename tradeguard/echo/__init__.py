"""The echo service (tradeguard.echo.v1): a tiny servicer for the kit's own tests and the chain benchmark.

It echoes what it is sent in the three call shapes the kit wraps (unary `Echo`, server-streaming `Expand`,
client-streaming `Collect`), so the kit is tested on a service of its own instead of through a real one.
`echo_server(config, ...)` builds a `MeshServer` serving it (not started); `ECHO_RULES` lets the `ops`
workload call every method.

(The servicer lives in the package's `__init__` because the generated code is the package
`tradeguard.echo.v1`: a module `tradeguard/echo.py` beside a package `tradeguard/echo/` would be shadowed.)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.mesh import pki, tls
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import MeshServer, ServerConfig, Service
from tradeguard.rpc.handlers import Layer

__all__ = ["ECHO", "ECHO_RULES", "EchoServicer", "RunningEcho", "echo_server", "echo_service", "running_echo"]

ECHO = "tradeguard.echo.v1.EchoService"
#: Every echo method to the `ops` workload (deny by default for the others).
ECHO_RULES: Mapping[str, frozenset[str]] = {f"/{ECHO}/*": frozenset({"ops"})}
#: `Expand` streams at most this many responses, whatever `count` asks.
MAX_EXPAND = 1000

Context = grpc.aio.ServicerContext[Any, Any]


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Echo: the request's text, tone and parts back. Expand: `count` responses (at most 1000). Collect: the
    texts of the stream joined, and how many there were."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Context) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(text=request.text, tone=request.tone, parts=request.parts)

    async def Expand(  # grpc.aio: an async generator
        self, request: echo_pb2.ExpandRequest, context: Context
    ) -> AsyncIterator[echo_pb2.ExpandResponse]:
        for index in range(min(request.count, MAX_EXPAND)):
            yield echo_pb2.ExpandResponse(text=request.text, index=index)

    async def Collect(  # grpc.aio: an async iterator of requests
        self, request_iterator: AsyncIterator[echo_pb2.CollectRequest], context: Context
    ) -> echo_pb2.CollectResponse:
        texts = [request.text async for request in request_iterator]
        return echo_pb2.CollectResponse(text="".join(texts), count=len(texts))


def echo_service(servicer: echo_pb2_grpc.EchoServiceServicer | None = None) -> Service:
    """The echo service to mount on a MeshServer (a fresh `EchoServicer` unless one is given)."""
    echo = servicer if servicer is not None else EchoServicer()
    return Service(ECHO, lambda server: echo_pb2_grpc.add_EchoServiceServicer_to_server(echo, server))


def echo_server(
    config: ServerConfig,
    trust_domain: str,
    *,
    rules: Mapping[str, frozenset[str]] = ECHO_RULES,
    layers: Sequence[Layer] = (),
    servicer: echo_pb2_grpc.EchoServiceServicer | None = None,
) -> MeshServer:
    """A MeshServer serving the echo service with the kit's whole chain (call `start()` on it)."""
    return MeshServer(config, MethodPolicy(trust_domain, rules), [echo_service(servicer)], layers=layers)


@dataclass
class RunningEcho:
    """An echo MeshServer serving on loopback, and how to call it as one of the PKI's workloads."""

    server: MeshServer
    paths: pki.PkiPaths
    name: str

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def channel(self, caller: str = "ops") -> MeshChannel:
        """A mesh channel to the echo server with `caller`'s workload certificate."""
        return MeshChannel(self.target, self.name, tls.Workload.of(self.paths, caller))

    @staticmethod
    def stub(channel: grpc.aio.Channel) -> echo_pb2_grpc.EchoServiceAsyncStub:
        return echo_pb2_grpc.EchoServiceStub(channel)


@contextlib.asynccontextmanager
async def running_echo(
    paths: pki.PkiPaths,
    *,
    name: str = "echo",
    rules: Mapping[str, frozenset[str]] = ECHO_RULES,
    layers: Sequence[Layer] = (),
    servicer: echo_pb2_grpc.EchoServiceServicer | None = None,
    **config: Any,
) -> AsyncIterator[RunningEcho]:
    """Serve the echo service as workload `name` of the PKI at `paths` (its certificate is issued when missing)
    on a free loopback port, with the kit's whole chain; stopped on exit. `config`: more ServerConfig fields."""
    if not paths.cert(name).exists():
        pki.issue(paths, name)
    server_config = ServerConfig(name=name, port=0, home=paths.home, **config)
    server = echo_server(
        server_config,
        pki.trust_domain(paths),
        rules=rules,
        layers=layers,
        servicer=servicer,
    )
    await server.start()
    try:
        yield RunningEcho(server, paths, name)
    finally:
        await server.stop(grace=0, drain=0)
