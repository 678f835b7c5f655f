"""Testing support for services built on the kit (ours and a firm's own): no mocks of grpc, TLS or databases.

- `FakeClock`: the microsecond clock cores and stores are given, moved by hand (tests never sleep);
- `eventually`: wait for a state, not for a guessed delay;
- `dev_pki`: a throw-away CA and workload certificates in a directory;
- `running_service`: a declared service started exactly as production starts it (`tradeguard.service.start`),
  on a free port, with a `channel(caller)` to call it as any workload; stopped (store closed) on exit;
- `LogCapture`: the per-RPC log lines as rendered (JSON, after redaction), to assert what was logged and that no
  secret was;
- `rich_status`: a failed call's `google.rpc.Status` decoded into plain fields (see tradeguard.rpc.status);
- `free_port`: a loopback port for a server a test or benchmark starts as a process, never the same one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.observability.logging import configure_logging
from tradeguard.rpc.status import RichStatus, rich_status
from tradeguard.service import Declaration, Running, ServiceSettings, start

__all__ = [
    "FakeClock",
    "LogCapture",
    "RichStatus",
    "RunningService",
    "dev_pki",
    "eventually",
    "free_port",
    "rich_status",
    "running_service",
]

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free at the time of asking that this process has never handed out before.

    The kernel may give the same ephemeral port to two askings in a row once the first socket is closed: an Envoy
    under test once got one port for its listener and its admin interface and could not bind the second. Ports
    handed out here are never handed out again, so the servers one test configures always get distinct ports
    (another process can still take a port before the server binds it: a test then fails, it never hangs)."""
    with _handed_out_lock:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("every loopback port the kernel offered was handed out already")


S = TypeVar("S", bound=ServiceSettings)
St = TypeVar("St")

DEFAULT_TRUST_DOMAIN = "tradeguard.test"
DEFAULT_WORKLOADS = ("ops", "auth", "ratelimit", "audit", "keyvault", "trading", "monitor", "edge")


class FakeClock:
    """A wall clock in microseconds since the epoch that moves only when told to."""

    def __init__(self, start_us: int = 1_700_000_000_000_000) -> None:
        self.now_us = start_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, us: int = 1) -> None:
        if us < 0:
            raise ValueError("a clock does not go back")
        self.now_us += us

    def advance_s(self, seconds: float) -> None:
        self.advance(round(seconds * 1_000_000))


async def eventually(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait until `condition()` holds (polled each millisecond); fail after `within_s` seconds.

    For tests that must reach a state before acting: they wait for the state itself, not for a guessed delay."""
    try:
        async with asyncio.timeout(within_s):
            while not condition():  # noqa: ASYNC110 - the states polled have no event to wait on
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"condition not reached within {within_s} s") from None


def dev_pki(
    home: Path, workloads: Iterable[str] = DEFAULT_WORKLOADS, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> pki.PkiPaths:
    """A fresh CA under `home/pki` and a certificate for each workload (SPIFFE ID `…/svc/<name>`)."""
    paths = pki.PkiPaths(home)
    pki.init_ca(paths, trust_domain)
    for name in workloads:
        pki.issue(paths, name)
    return paths


@dataclass
class RunningService(Generic[S, St]):
    """A started service and how to call it."""

    running: Running[S, Any]
    paths: pki.PkiPaths

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def channel(self, caller: str = "ops") -> MeshChannel:
        """A mutual-TLS channel to the service as workload `caller` (its certificate from `paths`)."""
        name = self.running.settings.server.name
        return MeshChannel(self.target, name, tls.Workload.of(self.paths, caller))


@contextlib.asynccontextmanager
async def running_service(
    declaration: Declaration[S, Any], settings: S, paths: pki.PkiPaths
) -> AsyncIterator[RunningService[S, Any]]:
    """`declaration` started with `settings` (give `server.port=0` for a free port); stopped at once on exit
    (no drain, no grace), its tasks cancelled and its store closed."""
    running = await start(declaration, settings)
    try:
        yield RunningService(running, paths)
    finally:
        await running.stop(grace=0, drain=0)


class LogCapture:
    """Logging configured process-wide onto a buffer, rendered exactly as in production (JSON, redacted)."""

    def __init__(self, level: str = "debug") -> None:
        self.out = io.StringIO()
        configure_logging(json=True, stream=self.out, level=level)

    @property
    def text(self) -> str:
        """Everything written, as rendered: search it for secrets that must not be there."""
        return self.out.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line]

    def rpc_lines(self, method: str | None = None) -> list[dict[str, Any]]:
        """The one-per-RPC lines (event `rpc`), of `method` (its full name, `/pkg.Service/Method`) if given."""
        return [
            line
            for line in self.lines()
            if line.get("event") == "rpc" and (method is None or line.get("method") == method)
        ]

    async def settled_rpc_lines(
        self, count: int, method: str | None = None, within_s: float = 10.0
    ) -> list[dict[str, Any]]:
        """The rpc lines once `count` are written: a call's status can reach the client just before the
        server has logged it (an aborting handler sends its status as it aborts)."""
        await eventually(lambda: len(self.rpc_lines(method)) >= count, within_s)
        return self.rpc_lines(method)

    def clear(self) -> None:
        self.out.seek(0)
        self.out.truncate(0)
