"""A firm's own grpc.aio service behind Tradeguard's guard: adopting the guard is the three
statements marked `# guard` below (and its settings).

The service here is a quoting desk built on the echo proto (tradeguard.echo.v1): any grpc.aio servicer works the
same. Each method names the permission its caller needs (deny by default: a method not listed is refused); the
guard verifies a JWT in process or a signed API-key request with the auth service, and hands the handler the
verified principal (`current_principal()`). Every call acts for that principal's account.

Run it (after `tradeguard pki init` and `tradeguard pki issue desk`, with the auth service up):

    python examples/guarded_service.py

Settings (the kit's reader, prefix TRADEGUARD_DESK_): PORT (default 50100), AUTH_TARGET (default 127.0.0.1:50051),
RATELIMIT_TARGET (default 127.0.0.1:50052), QUOTA (default true: every verified call is counted by the rate-limit
service; over a limit the caller gets RESOURCE_EXHAUSTED, and with the rate limiter unreachable UNAVAILABLE),
AUDIT_TARGET (default 127.0.0.1:50053), AUDIT (default true: every call is recorded by the audit service and the
response held until the record is durable; with the audit service down, UNAVAILABLE), JWT_ISSUER, JWT_AUDIENCE and
the other guard settings (tradeguard.guard.config); TRADEGUARD_HOME for the PKI. The auth, rate-limit and audit
services must let the `desk` workload call their guard methods: start them with TRADEGUARD_AUTH_GUARD_WORKLOADS=desk,
TRADEGUARD_RATELIMIT_GUARD_WORKLOADS=desk and TRADEGUARD_AUDIT_GUARD_WORKLOADS=desk.
Clients sign with `tradeguard.guard.client.signing_interceptors(ApiKeyCredentials(key_id, secret=...))` or send a
token with `bearer_interceptors(token)`.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.guard import GuardConfig, GuardSettings, guard_for
from tradeguard.mesh import pki
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.server import MeshServer, ServerConfig, Service
from tradeguard.observability.logging import configure_logging
from tradeguard.principal import current_principal
from tradeguard.settings import Env, SettingsError

NAME = "desk"  # this service's workload: its certificate's SPIFFE ID is spiffe://<trust domain>/svc/desk
SERVICE = "tradeguard.echo.v1.EchoService"
DEFAULT_PORT = 50100

# Which workloads may call (the mesh's gate) and which permission each method needs (the guard's).
RULES = {f"/{SERVICE}/*": frozenset({"edge", "trading-client", "ops"})}
PERMISSIONS = {
    f"/{SERVICE}/Echo": "orders:read",
    f"/{SERVICE}/Expand": "orders:read",
    f"/{SERVICE}/Collect": "orders:write",
}


class Desk(echo_pb2_grpc.EchoServiceServicer):
    """Quotes for the caller's account: the guard has verified who is calling before any of this runs."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        principal = current_principal()
        assert principal is not None  # the guard let the call in
        return echo_pb2.EchoResponse(text=f"{principal.account_id}: {request.text}")

    async def Expand(
        self, request: echo_pb2.ExpandRequest, context: Any
    ) -> AsyncIterator[echo_pb2.ExpandResponse]:
        principal = current_principal()
        assert principal is not None
        for index in range(min(request.count, 100)):
            yield echo_pb2.ExpandResponse(text=f"{principal.account_id}: {request.text}", index=index)

    async def Collect(self, request_iterator: Any, context: Any) -> echo_pb2.CollectResponse:
        principal = current_principal()
        assert (
            principal is not None
        )  # the chain starts a guarded stream's handler only after its first message
        texts = [request.text async for request in request_iterator]
        return echo_pb2.CollectResponse(text=f"{principal.account_id}: {' '.join(texts)}", count=len(texts))


async def serve(config: ServerConfig, guard_settings: GuardSettings, stop: asyncio.Event) -> None:
    trust_domain = pki.trust_domain(config.pki)
    guard = guard_for(  # guard: what it guards and how it reaches the auth service
        GuardConfig(services=[SERVICE], permissions=PERMISSIONS, settings=guard_settings),
        workload=config.workload,
        trust_domain=trust_domain,
    )
    desk = Desk()
    server = MeshServer(
        config,
        MethodPolicy(trust_domain, RULES),
        [
            Service(
                SERVICE,
                lambda grpc_server: echo_pb2_grpc.add_EchoServiceServicer_to_server(desk, grpc_server),
            )
        ],
        layers=[guard.layer],  # guard: in front of the handlers
    )
    async with guard:  # guard: the revocation stream and the key refresh run while serving
        port = await server.start()
        print(f"{NAME} serving on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        await server.stop()


def main() -> int:
    configure_logging()
    try:
        config = ServerConfig.from_env(NAME, DEFAULT_PORT)
        guard_settings = GuardSettings.read(Env("TRADEGUARD_DESK"))  # TRADEGUARD_DESK_AUTH_TARGET, ...
    except SettingsError as error:
        print(f"{NAME}: {error}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, guard_settings, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
