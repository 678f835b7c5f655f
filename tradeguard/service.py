"""The service runner: a service is declared once (`Declaration`) and run one way.

A declaration names the service (its port and gRPC name come from `tradeguard.registry`), the generated
`add_…_to_server` call, its method rules (which workload may call which method), how it reads its own settings,
its store backends and its build function. `main(declaration)` is all a service's `__main__` does:

    argv → operator subcommand, usage, or serve
    logging → settings (errors name the variable; no traceback) → tracing → store → build → MeshServer → serve
    SIGTERM/SIGINT → health NOT_SERVING, drain, in-flight calls finish → background tasks cancelled → closers
    (reverse order) → store closed

`start(declaration, settings)` does the same without signals and returns a `Running` handle: tests and benchmarks
start a service exactly as production does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from tradeguard import eventloop
from tradeguard.audit.recorder import Recorder
from tradeguard.audit.recording import RecordingLayer, RecordingSettings
from tradeguard.guard.config import GuardConfig, GuardSettings, guard_for
from tradeguard.mesh import handshake_log, pki
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import MeshServer, ServerConfig, Service
from tradeguard.observability.logging import configure_logging, get_logger
from tradeguard.observability.tracing import configure_tracing
from tradeguard.registry import Registered, env_prefix, lookup
from tradeguard.rpc.handlers import Layer
from tradeguard.settings import Env, SettingsError
from tradeguard.storage import database_url, open_store

__all__ = [
    "NO_DATABASE",
    "Assembly",
    "CommonSettings",
    "Declaration",
    "NoStore",
    "Running",
    "ServiceSettings",
    "Stores",
    "Wiring",
    "main",
    "read_settings",
    "serve",
    "start",
]

_log = get_logger("tradeguard.service")

HEALTH_PROBE_S = 1.0  # how often an `Assembly.health` probe runs (and how long one may take)

St = TypeVar("St", bound="Closable")
S = TypeVar("S", bound="ServiceSettings")


class Closable(Protocol):
    async def close(self) -> None: ...


class ServiceSettings(Protocol):
    """What the runner needs of a service's settings; each service's `Settings` adds its own fields."""

    @property
    def server(self) -> ServerConfig: ...

    @property
    def database_url(self) -> str: ...


@dataclass(frozen=True)
class CommonSettings:
    """The settings every service has: the shared server settings and its database URL
    (`TRADEGUARD_<NAME>_DATABASE_URL`: `sqlite:///<path>`, by default `$TRADEGUARD_HOME/data/<name>.db`, or
    `postgresql://…`)."""

    server: ServerConfig
    database_url: str


class NoStore:
    """The store of a service that keeps no records of its own (the rate limiter, whose counters live in Redis
    or in process): nothing to open, nothing to close. Declared with `stores=NO_DATABASE`."""

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Stores(Generic[St]):
    """How a service opens its store: the embedded default (a SQLite file) or PostgreSQL, chosen by URL."""

    sqlite: Callable[[Path], Awaitable[St]]
    postgres: Callable[[str], Awaitable[St]]
    database: bool = True  # False: no database at all; the URL is never looked at (`NO_DATABASE`)

    async def open(self, url: str) -> St:
        if not self.database:
            return await self.sqlite(Path(os.devnull))
        return await open_store(url, sqlite=self.sqlite, postgres=self.postgres)


async def _no_store(_: object) -> NoStore:
    return NoStore()


NO_DATABASE: Stores[NoStore] = Stores(sqlite=_no_store, postgres=_no_store, database=False)


@dataclass(frozen=True)
class Wiring(Generic[S, St]):
    """What a build function is given: its settings, its open store, the mesh's trust domain, and for a service
    that records its security events (`Declaration.recorded`, recording on) the recorder its recording layer uses
    (for events a layer cannot see, such as a refusal answered in-band: the auth service's Envoy Check)."""

    settings: S
    store: St
    trust_domain: str
    recorder: Recorder | None = None


BackgroundTask = Callable[[], Coroutine[Any, Any, None]]
Closer = Callable[[], Awaitable[None]]


@dataclass
class Assembly:
    """What a build function returns: the servicer to mount, background tasks to run while serving (never
    restarted: a task that ends with an error is logged; a task that must survive errors loops and catches
    them itself), closers run at shutdown in reverse order (before the store closes), and the service's own
    layers for the kit's chain (after authorisation and decoding; they see the raw request bytes)."""

    servicer: object
    tasks: Sequence[BackgroundTask] = ()
    closers: Sequence[Closer] = ()
    core: object = None  # the service's core, for in-process callers and tests (`Running.core`)
    layers: Sequence[
        Layer
    ] = ()  # checks of the service's own in the kit's chain (see tradeguard.rpc.handlers)
    # more gRPC services on the same server, behind the same chain and the declaration's rules (e.g. the auth
    # service's envoy.service.auth.v3.Authorization beside its own)
    extra_services: Sequence[Service] = ()
    # what the service's health depends on beyond serving (its Redis, say): probed every `HEALTH_PROBE_S`; the
    # server's health for the service goes NOT_SERVING while it answers False or fails, SERVING again after
    health: Callable[[], Awaitable[bool]] | None = None


@dataclass(frozen=True)
class Declaration(Generic[S, St]):
    """A service, declared once."""

    name: str
    register: Callable[[Any, grpc.aio.Server], None]  # the generated add_<Service>Servicer_to_server
    # method → workload names allowed (deny by default); or computed from the settings, once, at start-up
    rules: Mapping[str, Iterable[str]] | Callable[[S], Mapping[str, Iterable[str]]]
    settings: Callable[[Env, CommonSettings], S]  # reads the service's own settings (its prefix)
    stores: Stores[St]  # NO_DATABASE: the service keeps no records (its store is a `NoStore`)
    build: Callable[[Wiring[S, St]], Awaitable[Assembly]]
    summary: str = ""
    commands: Mapping[str, Callable[[list[str]], int]] = field(default_factory=dict)  # operator subcommands
    # method → the permission it needs: `start()` mounts the guard (tradeguard.guard) in front of the handlers,
    # deny by default (a method of the service not listed here nor in `public_methods` is refused). The
    # settings then need a `guard: GuardSettings` field.
    permissions: Mapping[str, str] | None = None
    public_methods: frozenset[str] = frozenset()  # methods of a guarded service open without credentials
    # guarded methods the guard's quota stage does not count (the others are counted by the rate-limit service
    # when the guard's settings have `quota` on, the default)
    unmetered_methods: frozenset[str] = frozenset()
    # guarded methods that take effect (change state): the guard's audit stage has their accepted event
    # acknowledged BEFORE their handler runs (write-ahead, tradeguard.guard.audit), not beside it
    effect_methods: frozenset[str] = frozenset()
    # method → the action it records: the service's own security events, recorded in the audit service before
    # each response is released (tradeguard.audit.recording; fail closed). The settings then need a
    # `recording: RecordingSettings` field (on by default).
    recorded: Mapping[str, str] | None = None
    unrecorded_callers: frozenset[str] = frozenset()  # workloads whose calls are not recorded (see recording)

    @property
    def registered(self) -> Registered:
        return lookup(self.name)

    def rules_for(self, settings: S) -> Mapping[str, Iterable[str]]:
        return self.rules(settings) if callable(self.rules) else self.rules


def read_settings(declaration: Declaration[S, St], environ: MutableMapping[str, str] | None = None) -> S:
    """The service's settings from the environment, read once; `SettingsError` names the variable."""
    entry = declaration.registered
    own = Env(env_prefix(entry.name), environ)
    server = ServerConfig.from_env(entry.name, entry.port, environ)
    url = database_url(own, server.home / "data" / f"{entry.name}.db")
    return declaration.settings(own, CommonSettings(server=server, database_url=url))


class Running(Generic[S, St]):
    """A started service: its server (serving on `port`), store and assembly. `stop()` shuts it down in order."""

    def __init__(self, settings: S, server: MeshServer, store: St, assembly: Assembly) -> None:
        self.settings = settings
        self.server = server
        self.store = store
        self.assembly = assembly
        self.port = server.port
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def core(self) -> object:
        return self.assembly.core

    def _watch_health(self, probe: Callable[[], Awaitable[bool]], full_name: str) -> None:
        async def watch_health() -> None:
            serving: bool | None = None
            while True:
                try:
                    ok = bool(await asyncio.wait_for(probe(), HEALTH_PROBE_S))
                except asyncio.CancelledError:
                    raise
                except Exception:  # a probe that fails or hangs reports the dependency down
                    ok = False
                if ok != serving and not self.server.draining:
                    serving = ok
                    status = (
                        health_pb2.HealthCheckResponse.SERVING
                        if ok
                        else health_pb2.HealthCheckResponse.NOT_SERVING
                    )
                    for name in ("", full_name):
                        await self.server.health.set(name, status)
                    _log.info("health", service=self.settings.server.name, serving=ok)
                await asyncio.sleep(HEALTH_PROBE_S)

        task = asyncio.create_task(watch_health(), name=f"{self.settings.server.name}:health")
        task.add_done_callback(_report_task_end)
        self._tasks.append(task)

    def _start_tasks(self) -> None:
        for make in self.assembly.tasks:
            task = asyncio.create_task(make(), name=f"{self.settings.server.name}:{make.__name__}")
            task.add_done_callback(_report_task_end)
            self._tasks.append(task)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        try:
            await self.server.stop(grace=grace, drain=drain)
        finally:
            await self._close(cancel_tasks=True)

    async def _close(self, *, cancel_tasks: bool) -> None:
        tasks, self._tasks = self._tasks, []
        if cancel_tasks:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        try:
            for closer in reversed(self.assembly.closers):
                try:
                    await closer()
                except Exception as error:  # the others and the store must still close
                    _log.error("close_failed", service=self.settings.server.name, error=type(error).__name__)
        finally:
            await self.store.close()


def _report_task_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        _log.error("background_task_failed", task=task.get_name(), error=type(error).__name__, exc_info=error)


async def start(declaration: Declaration[S, St], settings: S) -> Running[S, St]:
    """Open the store, build, start serving (port 0 picks a free port: see `Running.port`), start the tasks.
    Whatever was opened is closed again if a later step fails."""
    entry = declaration.registered
    store: Any = (
        NoStore() if declaration.stores is None else await declaration.stores.open(settings.database_url)
    )
    recording: tuple[Recorder, MeshChannel] | None = None
    try:
        trust_domain = pki.trust_domain(settings.server.pki)
        recording = _recorder(declaration, settings)
        recorder = None if recording is None else recording[0]
        assembly = await declaration.build(Wiring(settings, store, trust_domain, recorder))
        if recording is not None:
            assembly = _recording(declaration, trust_domain, assembly, *recording)
        if declaration.permissions is not None:
            assembly = _guarded(declaration, settings, trust_domain, assembly)
    except BaseException:
        if recording is not None:
            await recording[1].close()
        await store.close()
        raise
    servicer = assembly.servicer
    server = MeshServer(
        settings.server,
        MethodPolicy(trust_domain, declaration.rules_for(settings)),
        [
            Service(entry.full_name, lambda grpc_server: declaration.register(servicer, grpc_server)),
            *assembly.extra_services,
        ],
        layers=assembly.layers,
    )
    running = Running(settings, server, store, assembly)
    try:
        await server.start()
    except BaseException:
        await running._close(cancel_tasks=False)
        raise
    running.port = server.port
    running._start_tasks()
    if assembly.health is not None:
        running._watch_health(assembly.health, entry.full_name)
    return running


def _guarded(declaration: Declaration[S, St], settings: S, trust_domain: str, assembly: Assembly) -> Assembly:
    """`assembly` with the guard first among its layers, its background work and its closer."""
    guard_settings = getattr(settings, "guard", None)
    if not isinstance(guard_settings, GuardSettings):
        raise TypeError(
            f"{declaration.name} declares permissions: its settings need a `guard: GuardSettings`"
        )
    guard = guard_for(
        GuardConfig(
            services=[declaration.registered.full_name],
            permissions=declaration.permissions or {},
            public=declaration.public_methods,
            unmetered=declaration.unmetered_methods,
            effects=declaration.effect_methods,
            settings=guard_settings,
        ),
        workload=settings.server.workload,
        trust_domain=trust_domain,
    )
    return replace(
        assembly,
        layers=[guard.layer, *assembly.layers],
        tasks=[*assembly.tasks, guard.run],
        closers=[guard.close, *assembly.closers],
    )


def _recorder(declaration: Declaration[S, St], settings: S) -> tuple[Recorder, MeshChannel] | None:
    """The recorder of a service that declares recorded methods, on its channel to the audit service (as the
    service's own workload); None when it declares none or its settings' `recording` is off (logged)."""
    if not declaration.recorded:
        return None
    recording = getattr(settings, "recording", None)
    if not isinstance(recording, RecordingSettings):
        raise TypeError(
            f"{declaration.name} declares recorded methods: its settings need a `recording: RecordingSettings`"
        )
    if not recording.enabled:
        _log.warning("audit_recording_off", service=declaration.name)
        return None
    channel = MeshChannel(recording.target, recording.server_name, settings.server.workload)
    return Recorder(channel, name=f"{declaration.name}-audit"), channel


def _recording(
    declaration: Declaration[S, St],
    trust_domain: str,
    assembly: Assembly,
    recorder: Recorder,
    channel: MeshChannel,
) -> Assembly:
    """`assembly` with the recording layer first among its layers and the recorder's closers (the events still
    queued are sent first, then the channel closes)."""
    full_name = declaration.registered.full_name
    layer = RecordingLayer(
        recorder,
        {f"/{full_name}/{method}": action for method, action in (declaration.recorded or {}).items()},
        trust_domain=trust_domain,
        unrecorded=declaration.unrecorded_callers,
    )
    return replace(
        assembly, layers=[layer, *assembly.layers], closers=[channel.close, recorder.close, *assembly.closers]
    )


async def serve(
    declaration: Declaration[S, St], settings: S, *, stop_event: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT (or `stop_event`), then shut down gracefully."""
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await start(declaration, settings)
        try:
            await stop.wait()
            _log.info("shutting_down", service=settings.server.name)
        finally:
            await running.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def usage(declaration: Declaration[Any, Any]) -> str:
    entry = declaration.registered
    lines = [
        f"usage: python -m {entry.module} [COMMAND ...]",
        "",
        f"{declaration.summary or entry.full_name}",
        f"With no argument: serve {entry.full_name} on mutual TLS, port {entry.port} "
        f"(${env_prefix(entry.name)}_PORT), settings from the environment (see the module's settings.py).",
    ]
    if declaration.commands:
        lines += ["", "operator commands:"]
        lines += [f"  {name}" for name in declaration.commands]
    return "\n".join(lines)


def main(declaration: Declaration[Any, Any], argv: Sequence[str] | None = None) -> int:
    """`python -m services.<name>`: an operator subcommand, usage (`--help`, or a refusal of anything else),
    or the service itself until SIGTERM. Returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        command = declaration.commands.get(args[0])
        if command is not None:
            return command(args[1:])
        if args[0] in ("-h", "--help"):
            print(usage(declaration))
            return 0
        print(f"{usage(declaration)}\n\nerror: unknown argument {args[0]!r}", file=sys.stderr)
        return 2
    handshake_log.install()  # grpc core's refused handshakes become structured events (before logging)
    configure_logging()
    try:
        settings = read_settings(declaration)
    except SettingsError as error:
        print(f"{declaration.name}: {error}", file=sys.stderr)
        return 2
    configure_tracing(settings.server.name, settings.server.otlp_endpoint)
    eventloop.run(serve(declaration, settings), settings.server.event_loop)
    return 0
