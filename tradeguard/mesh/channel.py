"""Client channels on the mesh: mutual TLS with the caller's workload certificate, following rotation.

grpc has no reloadable channel credentials, so `MeshChannel` is a `grpc.aio.Channel` that holds a
real channel and, at most once per `check_interval`, looks at its certificate files; when they changed
(and the new key matches the new certificate) the next calls go to a fresh channel, and the old one is
closed after a grace period so calls in flight on it finish. Generated stubs work on it unchanged.

Every call goes through the kit's client interceptor (tradeguard.mesh.client): a handler's request id goes out
with its nested calls as `x-request-id`, and a call without a timeout gets `default_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from tradeguard.mesh import tls
from tradeguard.mesh.client import DEFAULT_TIMEOUT_S, CallDefaults
from tradeguard.observability import tracing


def _options(server_name: str) -> list[tuple[str, Any]]:
    return [
        # the server's certificate must carry the DNS name of the service we mean to reach
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


class _Rebinding:
    """A multicallable that asks the MeshChannel for the current channel on every call."""

    def __init__(self, owner: MeshChannel, kind: str, method: str, kwargs: dict[str, Any]) -> None:
        self._owner, self._kind, self._method, self._kwargs = owner, kind, method, kwargs
        self._bound: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        bound = self._bound
        if bound is None or bound[0] is not channel:
            factory = getattr(channel, self._kind)
            bound = (channel, factory(self._method, **self._kwargs))
            self._bound = bound
        return bound[1](*args, **kwargs)


class MeshChannel(grpc.aio.Channel):
    def __init__(
        self,
        target: str,
        server_name: str,
        workload: tls.Workload,
        *,
        check_interval: float = 1.0,
        close_grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        """`default_timeout_s`: the deadline of a call made without a timeout (None: such calls wait forever)."""
        self.target, self.server_name, self.workload = target, server_name, workload
        self._defaults = CallDefaults(default_timeout_s)
        self._check_interval, self._close_grace, self._clock = check_interval, close_grace, clock
        self._stamp = workload.stamp()
        self._channel = self._open()
        self._next_check = clock() + check_interval
        self._retiring: set[asyncio.Task[None]] = set()
        self.generation = 0

    def _open(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.target,
            tls.channel_credentials(self.workload),
            options=_options(self.server_name),
            interceptors=[
                *self._defaults.interceptors(),
                *(tracing.client_interceptors() if tracing.enabled() else ()),
            ],
        )

    def current(self) -> grpc.aio.Channel:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            self.reload_if_changed()
        return self._channel

    def reload_if_changed(self) -> bool:
        """Switch to a new channel if the certificate files changed and are consistent."""
        try:
            stamp = self.workload.stamp()
            if stamp == self._stamp or self.workload.read() is None:
                return False
            fresh = self._open()
        except OSError:
            return False
        old, self._channel, self._stamp = self._channel, fresh, stamp
        self.generation += 1
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(self._close_grace)
        await channel.close(None)

    # --- grpc.aio.Channel ---------------------------------------------------------------------------------

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, "unary_unary", method, _kw(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, "unary_stream", method, _kw(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, "stream_unary", method, _kw(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, "stream_stream", method, _kw(args, kwargs))

    async def close(self, grace: float | None = None) -> None:
        for task in list(self._retiring):
            task.cancel()
        await self._channel.close(grace)

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


def _kw(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("request_serializer", "response_deserializer", "_registered_method")
    merged = dict(zip(names, args, strict=False))
    merged.update(kwargs)
    return merged


def mesh_channel(
    workload: tls.Workload,
    target: str,
    server_name: str,
    *,
    default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> MeshChannel:
    """A channel from this workload to `server_name` at `target` (host:port), over mutual TLS."""
    return MeshChannel(target, server_name, workload, default_timeout_s=default_timeout_s)
