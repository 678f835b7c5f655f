"""`tradeguard up`: the whole suite as separate processes on a dev PKI, with certificate rotation.

The supervisor makes the PKI on first run (and reuses it after), issues a certificate to every workload the
command line can act as (ops and each registered service), checks that every port it will use is free,
starts the services of the registry's SUITE in order, and reports the suite up once each of its own children
answers its health check over mutual TLS. While running it renews certificates at half their lifetime (also
during start-up, before each health check: a certificate that expires while a slow machine starts the suite is
renewed, not waited on), notices at once when a service exits and restarts it with exponential backoff (and
stops the suite when a service keeps crashing), and on Ctrl-C or SIGTERM stops every service gracefully.

The rate-limit service reads its limits from $TRADEGUARD_HOME/config/limits.yaml: the supervisor installs the
packaged default there (owner-only) when it is absent and TRADEGUARD_RATELIMIT_LIMITS_FILE names no other file;
it never overwrites an existing one (edit it: the service re-reads it when it changes). The same for the trading
service's pre-trade risk limits: the packaged tradeguard/risk/risk.yaml to $TRADEGUARD_HOME/config/risk.yaml,
unless TRADEGUARD_TRADING_RISK_FILE names another file. Each guarded service is
told where this suite's auth, rate-limit and audit services listen.

The key vault keys the services use are created as ops, when missing (SERVICE_KEYS: the auth service's
`credentials` and `auth/jwt` before it starts; the audit service's checkpoint key `audit/checkpoint` once the
audit service is up, since the vault records the key's creation there); the auth and audit services are told
where this suite's key vault listens, the key vault and the auth service where its audit service listens (they
record their security events there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import os
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tradeguard import registry
from tradeguard.auth.v1 import auth_pb2, auth_pb2_grpc
from tradeguard.cli import common
from tradeguard.errors import DomainError, OpaqueError
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.mesh import pki, tls
from tradeguard.observability.logging import configure_logging, get_logger

_log = get_logger("tradeguard.up")

# The key vault keys the auth service uses (services/auth/settings.py) and the audit service signs its checkpoints
# with (services/audit/settings.py): only ops may create them, so the supervisor does, idempotently, before it
# starts the service.
AUTH_KEYS: tuple[tuple[str, keyvault_pb2.KeyType.ValueType], ...] = (
    ("credentials", keyvault_pb2.KEY_TYPE_AES256_GCM),
    ("auth/jwt", keyvault_pb2.KEY_TYPE_ED25519),
)
AUDIT_KEYS: tuple[tuple[str, keyvault_pb2.KeyType.ValueType], ...] = (
    ("audit/checkpoint", keyvault_pb2.KEY_TYPE_ED25519),
)
SERVICE_KEYS: dict[str, tuple[tuple[str, keyvault_pb2.KeyType.ValueType], ...]] = {
    "auth": AUTH_KEYS,
    "audit": AUDIT_KEYS,
}
_WITHOUT_KEYS = {
    "auth": "auth will fail to sign tokens and seal secrets until it exists",
    "audit": "audit will record but sign no checkpoint until it exists",
}

# The services each service calls (its `<NAME>_TARGET` settings, pointed at this suite's): the key vault and auth
# record their security events in the audit service, the audit service signs with the key vault, the monitor
# reads the audit log and acts through auth and trading; any other service is a guarded one (its guard's auth,
# quota and audit stages).
UPSTREAMS: dict[str, tuple[str, ...]] = {
    "keyvault": ("audit",),
    "audit": ("keyvault",),
    "auth": ("keyvault", "audit"),
    "ratelimit": (),
    "monitor": ("audit", "auth", "trading"),
}
GUARD_UPSTREAMS: tuple[str, ...] = ("auth", "ratelimit", "audit")

# Every workload the command line can act as: the operators and each registered service (so that the README's
# `tradeguard vault --as auth encrypt …` works before the auth service exists).
WORKLOADS: tuple[str, ...] = (common.OPERATOR, *registry.SERVICES)


def available(names: Sequence[str] = registry.SUITE) -> list[registry.Registered]:
    """The suite's services in start order, skipping any whose module is not built yet."""
    out = []
    for name in names:
        entry = registry.lookup(name)
        built = importlib.util.find_spec(entry.module) is not None
        if built and importlib.util.find_spec(f"{entry.module}.__main__") is not None:
            out.append(entry)
    return out


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = subparsers.add_parser(
        "up",
        help="start the whole suite on embedded defaults (SQLite, dev PKI)",
        description=__doc__,
        formatter_class=common.HelpFormatter,
    )
    common.add_home_option(up)
    up.add_argument(
        "--cert-hours",
        type=float,
        default=24.0,
        help="lifetime of the workload certificates it issues, in hours",
    )
    up.add_argument(
        "--check-seconds", type=float, default=30.0, help="how often to look for certificates due for renewal"
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds each service may take to answer its health check, at start and after a restart",
    )
    up.add_argument(
        "--max-fast-crashes",
        type=int,
        default=5,
        help="stop the suite when one service crashes this many times in a row, each time less than "
        "--stable-seconds after its start",
    )
    up.add_argument(
        "--stable-seconds",
        type=float,
        default=60.0,
        help="a service running this long has its crash count and restart delay reset",
    )
    up.set_defaults(func=lambda args: asyncio.run(Supervisor(args).run()))


@dataclass(frozen=True)
class Backoff:
    """Restart delays: `first_s`, doubling per crash in a row, at most `max_s`. A crash counts as "in a row"
    when the service ran less than `stable_s`; after `max_fast_crashes` of those the supervisor gives up."""

    first_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0
    max_fast_crashes: int = 5

    def delay(self, crashes_in_a_row: int) -> float:
        return float(min(self.max_s, self.first_s * 2 ** max(0, crashes_in_a_row - 1)))


class NotReady(Exception):
    """A service did not come up (exited, or no health answer from it in time)."""


class GaveUp(Exception):
    """A service kept crashing: the suite stops."""


class Stopping(Exception):
    """Ctrl-C or SIGTERM arrived while waiting."""


@dataclass
class Child:
    """One service: its registry entry, where it listens, and its current process."""

    service: registry.Registered
    port: int
    metrics_port: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False  # answered its health check since its last start
    crashes_in_a_row: int = 0
    restarts: int = 0

    @property
    def name(self) -> str:
        return self.service.name

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (a socket in TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` itself holds the listening socket of `port` (Linux /proc); None when unknown.

    So that a health answer from some other process on the port (another suite) is never taken for ours."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as rows:
                next(rows, None)
                for row in rows:
                    cols = row.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


class Supervisor:
    def __init__(
        self, args: argparse.Namespace, services: Sequence[registry.Registered] | None = None
    ) -> None:
        self.home: Path = args.home
        self.paths = pki.PkiPaths(self.home)
        self.lifetime = timedelta(hours=args.cert_hours)
        self.check_seconds: float = args.check_seconds
        self.ready_timeout: float = args.ready_timeout
        self.backoff = Backoff(stable_s=args.stable_seconds, max_fast_crashes=args.max_fast_crashes)
        self.services = list(services) if services is not None else available()
        self.children: dict[str, Child] = {}
        self.planned: dict[str, Child] = {}  # every service of the run, by name (spawned or not yet)
        self.stop = asyncio.Event()

    # --- the PKI ----------------------------------------------------------------------------------------------

    def prepare_pki(self) -> None:
        if pki.init_ca(self.paths):
            print(f"created a dev PKI in {self.paths.dir}", flush=True)
        self.renew()

    def renew(self) -> list[str]:
        """Rotate a due intermediate (the dev PKI keeps its root key), then re-issue every workload
        certificate that is due (past half-life, expired, missing, or under an older intermediate), the Envoy
        edge's included, whose bundle is then published to $TRADEGUARD_HOME/edge."""
        if pki.intermediate_due(self.paths):
            expiry = pki.rotate_intermediate(self.paths)
            _log.info("intermediate CA rotated", not_after=f"{expiry:%Y-%m-%dT%H:%M:%SZ}")
            print(f"rotated the intermediate CA (new one valid until {expiry:%Y-%m-%d}Z)", flush=True)
        renewed = pki.renew_due(self.paths, (*WORKLOADS, pki.EDGE), lifetime=self.lifetime)
        if renewed:
            _log.info("certificates renewed", workloads=renewed)
        if pki.publish_bundle(self.paths, pki.EDGE, self.paths.edge_dir):  # what the Envoy edge mounts
            _log.info("edge bundle published", directory=str(self.paths.edge_dir))
        return renewed

    async def keep_renewing(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            try:
                self.renew()
            except (OSError, ValueError) as error:  # logged and retried: the current certificates still serve
                _log.error("certificate renewal failed", error=str(error))

    # --- ports ------------------------------------------------------------------------------------------------

    def plan(self) -> list[Child]:
        """Each service's port and metrics port from the environment, refused when two coincide or one is
        taken (naming the variable that moves it)."""
        children = []
        owners: dict[int, str] = {}
        bound = common.host()
        for service in self.services:
            port = common.service_port(service.name)
            metrics = common.metrics_port(service.name, port)
            child = Child(service, port, metrics)
            prefix = registry.env_prefix(service.name)
            for number, variable, where in (
                (port, f"{prefix}_PORT", bound),
                (metrics, f"{prefix}_METRICS_PORT", "127.0.0.1"),
            ):
                if number in owners:
                    raise common.CliError(
                        f"port {number} is set for both {owners[number]} and {variable}: set {variable} to "
                        "another port"
                    )
                owners[number] = variable
                if port_in_use(where, number):
                    raise common.CliError(
                        f"port {number} on {where} ({service.name}) is already in use, by another Tradeguard "
                        f"suite or another program: stop it, or set {variable} to a free port"
                    )
            children.append(child)
        return children

    # --- children ---------------------------------------------------------------------------------------------

    def upstream(self, name: str) -> Child | None:
        """Service `name` of this run, spawned or still to come (its port is fixed by the plan)."""
        return self.planned.get(name) or self.children.get(name)

    def child_env(self, child: Child) -> dict[str, str]:
        env = dict(os.environ)
        prefix = registry.env_prefix(child.name)
        env["TRADEGUARD_HOME"] = str(self.home)
        env[f"{prefix}_PORT"] = str(child.port)
        env[f"{prefix}_METRICS_PORT"] = str(child.metrics_port)
        env.setdefault("PYTHONUNBUFFERED", "1")
        operator_set = ("TRADEGUARD_KEYVAULT_PASSPHRASE", "TRADEGUARD_KEYVAULT_PASSPHRASE_FILE")
        # where the services this one calls listen in this suite (the services' own defaults are the registry's)
        targets = [
            (f"{prefix}_{name.upper()}_TARGET", self.upstream(name))
            for name in UPSTREAMS.get(child.name, GUARD_UPSTREAMS)
        ]
        for variable, upstream in targets:
            if upstream is not None and not env.get(variable):  # an operator's own setting wins
                env[variable] = f"{common.connect_host()}:{upstream.port}"
        if child.name == "keyvault" and not any(env.get(name) for name in operator_set):
            # a file the vault reads once, not the environment (which /proc/<pid>/environ keeps showing)
            env["TRADEGUARD_KEYVAULT_PASSPHRASE_FILE"] = str(self.dev_vault_passphrase_file())
        return env

    def command(self, child: Child) -> list[str]:
        return [sys.executable, "-m", child.service.module]

    async def spawn(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(*self.command(child), env=self.child_env(child))
        child.started_at = asyncio.get_running_loop().time()
        child.ready = False
        _log.info("service started", service=child.name, pid=child.process.pid, port=child.port)

    def dev_vault_passphrase_file(self) -> Path:
        """The embedded default's sealing passphrase: made once, kept 0600 beside the data. In production the
        passphrase comes from the operator (TRADEGUARD_KEYVAULT_PASSPHRASE_FILE or `tradeguard vault unseal`)."""
        path = self.home / "data" / "dev-vault-passphrase"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        return path

    def install_limits(self) -> Path | None:
        """The rate limiter's packaged default limits (see `install_default`): config/limits.yaml, unless
        TRADEGUARD_RATELIMIT_LIMITS_FILE names another file."""
        return self.install_default(
            "ratelimit", registry.lookup("ratelimit").module, "limits.yaml", "LIMITS_FILE"
        )

    def install_risk_limits(self) -> Path | None:
        """The trading service's packaged default pre-trade risk limits (tradeguard/risk/risk.yaml, see
        `install_default`): config/risk.yaml, unless TRADEGUARD_TRADING_RISK_FILE names another file."""
        return self.install_default("trading", "tradeguard.risk", "risk.yaml", "RISK_FILE")

    def install_default(self, service: str, package: str, name: str, setting: str) -> Path | None:
        """A packaged default file copied to $TRADEGUARD_HOME/config/<name> (0600, its directory 0700) when that
        file is absent, the suite runs `service`, and the operator has not named another file (the service's
        `setting`); the path installed, else None. Never overwrites: the operator edits it (the service
        re-reads it when it changes)."""
        if not any(entry.name == service for entry in self.services):
            return None
        if os.environ.get(f"{registry.env_prefix(service)}_{setting}", "").strip():
            return None
        path = self.home / "config" / name
        if path.exists() or path.is_symlink():
            return None
        packaged = resources.files(package).joinpath(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # O_EXCL: a file that appeared meanwhile is kept, never replaced
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as out:
            out.write(packaged.read_bytes())
        print(f"installed the default {name} in {path} (edit it; the service re-reads it)", flush=True)
        return path

    async def ensure_auth_keys(self) -> None:
        """Create the auth service's key vault keys as ops unless they exist (see `ensure_service_keys`)."""
        await self.ensure_service_keys("auth")

    async def ensure_service_keys(self, service: str) -> None:
        """Create `service`'s key vault keys (SERVICE_KEYS) as ops unless they exist (ALREADY_EXISTS is success;
        a key of another type is refused). A failure is reported, not fatal: the service starts, and its calls
        that need the key fail until it is fixed."""
        vault = self.children.get("keyvault")
        keys = SERVICE_KEYS.get(service, ())
        if vault is None or not keys:
            return
        workload = tls.Workload.of(self.paths, common.OPERATOR)
        options = [("grpc.ssl_target_name_override", vault.name)]
        target = f"{common.connect_host()}:{vault.port}"
        async with grpc.aio.secure_channel(
            target, tls.channel_credentials(workload), options=options
        ) as channel:
            for name, key_type in keys:
                try:
                    if await ensure_key(channel, name, key_type, timeout_s=10.0):
                        _log.info("service key created", service=service, key=name)
                except DomainError as error:
                    cause = error.cause if isinstance(error, OpaqueError) else error.message
                    _log.error("service key not created", service=service, key=name, cause=cause)
                    print(
                        f"could not create the key vault key {name!r} for {service} ({cause}): "
                        f"{_WITHOUT_KEYS.get(service, 'its calls that need it fail until it exists')}",
                        file=sys.stderr,
                        flush=True,
                    )

    async def ensure_monitor_key(self) -> Path | None:
        """The monitor's own API key, for the kill switch (a guarded call needing `trading:halt`): when the suite
        runs the monitor and $TRADEGUARD_HOME/secrets/monitor-key.json is absent (and
        TRADEGUARD_MONITOR_KILL_SWITCH_CREDENTIALS_FILE names no other file), a user `monitor-<random>` with role
        risk-officer (a random password nobody keeps: it never logs in) and an HMAC key scoped `trading:halt`,
        usable from the suite's host only, are created as ops; the key id and secret go to that file (0600, its
        directory 0700), written once, never shown. A failure is reported, not fatal: the monitor starts and its
        kill-switch actions are SKIPPED until the file exists (docs/incident-response.md: the manual steps)."""
        auth = self.children.get("auth")
        if auth is None or not any(entry.name == "monitor" for entry in self.services):
            return None
        if os.environ.get("TRADEGUARD_MONITOR_KILL_SWITCH_CREDENTIALS_FILE", "").strip():
            return None
        path = self.home / "secrets" / "monitor-key.json"
        if path.exists() or path.is_symlink():
            return None
        workload = tls.Workload.of(self.paths, common.OPERATOR)
        options = [("grpc.ssl_target_name_override", auth.name)]
        host = common.connect_host().strip("[]")
        try:
            address = ipaddress.ip_address(host)
            allow = [f"{address}/{address.max_prefixlen}"]
        except ValueError:
            allow = []
        try:
            async with grpc.aio.secure_channel(
                f"{common.connect_host()}:{auth.port}", tls.channel_credentials(workload), options=options
            ) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                user = await stub.CreateUser(
                    auth_pb2.CreateUserRequest(
                        username=f"monitor-{secrets.token_hex(4)}",
                        password=secrets.token_urlsafe(32),
                        account_id="monitor",
                        roles=["risk-officer"],
                    ),
                    timeout=10,
                )
                created = await stub.CreateApiKey(
                    auth_pb2.CreateApiKeyRequest(
                        user_id=user.user.user_id,
                        kind=auth_pb2.API_KEY_KIND_HMAC,
                        scopes=["trading:halt"],
                        ip_allow_list=allow,
                        label="the monitor's kill switch",
                    ),
                    timeout=10,
                )
        except grpc.aio.AioRpcError as error:
            _log.error("monitor key not created", code=error.code().name)
            print(
                f"could not create the monitor's API key ({error.code().name}): its kill-switch actions are "
                "skipped until it has one (docs/incident-response.md)",
                file=sys.stderr,
                flush=True,
            )
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"key_id": created.key.key_id, "secret": created.secret}))
        _log.info("monitor key created", key_id=created.key.key_id)
        return path

    async def health(self, child: Child) -> bool:
        """One health check of `child` over mutual TLS, as ops."""
        workload = tls.Workload.of(self.paths, common.OPERATOR)
        options = [("grpc.ssl_target_name_override", child.name)]
        try:
            credentials = tls.channel_credentials(workload)
        except (OSError, ValueError):
            return False  # mid-renewal: the next attempt reads the new files
        target = f"{common.connect_host()}:{child.port}"
        try:
            async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5.0
                )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def wait_ready(self, child: Child) -> None:
        """Until `child`'s own process answers its health check: alive, holding its port's listening socket
        (when /proc says), SERVING. Due certificates are renewed before every attempt."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while True:
            if self.stop.is_set():
                raise Stopping
            process = child.process
            assert process is not None
            if process.returncode is not None:
                raise NotReady(f"{child.name} exited with code {process.returncode} during start-up")
            try:
                self.renew()
            except (OSError, ValueError) as error:
                _log.error("certificate renewal failed", error=str(error))
            answered = await self.health(child)
            if answered and process.returncode is None and listens_on(process.pid, child.port) is not False:
                child.ready = True
                return
            if loop.time() > deadline:
                raise NotReady(
                    f"{child.name} did not answer its health check within {self.ready_timeout:.0f}s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2)

    async def keep_running(self, child: Child) -> None:
        """Wait for `child`'s exit (noticed at once), restart it after a backoff delay, wait until it answers
        again; raise GaveUp once it has crashed `max_fast_crashes` times in a row."""
        loop = asyncio.get_running_loop()
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self.stop.is_set():
                return
            ran_s = loop.time() - child.started_at
            fast = ran_s < self.backoff.stable_s or not child.ready
            child.crashes_in_a_row = child.crashes_in_a_row + 1 if fast else 1
            if child.crashes_in_a_row >= self.backoff.max_fast_crashes:
                _log.error(
                    "service keeps crashing; stopping the suite",
                    service=child.name,
                    code=code,
                    crashes_in_a_row=child.crashes_in_a_row,
                )
                raise GaveUp(
                    f"{child.name} exited {child.crashes_in_a_row} times in a row, each within "
                    f"{self.backoff.stable_s:.0f}s of its start (last exit code {code}); stopping the suite "
                    "(its own log lines above say why)"
                )
            delay = self.backoff.delay(child.crashes_in_a_row)
            _log.warning(
                "service exited; restarting",
                service=child.name,
                pid=child.process.pid,
                code=code,
                ran_s=round(ran_s, 3),
                restart_in_s=delay,
                crashes_in_a_row=child.crashes_in_a_row,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                return
            await self.spawn(child)
            child.restarts += 1
            try:
                await self.wait_ready(child)
            except NotReady as error:
                _log.error("restarted service not ready", service=child.name, error=str(error))
                await self.terminate(child, grace_s=5.0)
                continue
            except Stopping:
                return
            _log.info(
                "service restarted",
                service=child.name,
                pid=child.process.pid,
                port=child.port,
                restarts=child.restarts,
            )

    async def terminate(self, child: Child, grace_s: float = 15.0) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            print(f"{child.name} did not stop within {grace_s:.0f}s; killing it", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def stop_all(self, grace_s: float = 15.0) -> None:
        self.stop.set()
        await asyncio.gather(*(self.terminate(child, grace_s) for child in reversed(self.children.values())))

    # --- the run ----------------------------------------------------------------------------------------------

    async def run(self) -> int:
        configure_logging()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            self.prepare_pki()
            children = self.plan()
            self.install_limits()
            self.install_risk_limits()
        except (OSError, ValueError) as error:
            raise common.CliError(str(error)) from None
        tasks: list[asyncio.Task[None]] = [loop.create_task(self.keep_renewing())]
        try:
            self.planned = {child.name: child for child in children}
            for child in children:
                self.children[child.name] = child
                if child.name != "audit":
                    await self.ensure_service_keys(child.name)
                await self.spawn(child)
                await self.wait_ready(child)
                if child.name == "audit":  # the vault records the key's creation in the audit service itself
                    await self.ensure_service_keys(child.name)
                if child.name == "auth":  # before the monitor starts: it reads its key at start-up
                    await self.ensure_monitor_key()
            for child in children:  # one that died while the next was starting is not "up"
                if not child.alive():
                    raise NotReady(f"{child.name} exited during start-up")
            self.banner()
            _log.info("suite up", services=[child.name for child in children])
            tasks += [loop.create_task(self.keep_running(child)) for child in children]
            stopped = loop.create_task(self.stop.wait())
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            for task in done:
                if task is not stopped:
                    task.result()  # GaveUp, or an unexpected error: raised here
            return 0
        except (NotReady, GaveUp) as error:
            print(f"tradeguard up: {error}", file=sys.stderr, flush=True)
            return 1
        except Stopping:
            return 0
        finally:
            for task in tasks:
                task.cancel()
            await self.stop_all()
            print("all services stopped", flush=True)

    def signed_order_lines(self) -> list[str]:
        """How to place a SIGNED order, as commands that run as printed: an operator creates a trader (with a
        random password in a 0600 file) and an HMAC API key for them (its secret saved 0600, shown nowhere), then
        `orders place` signs with it. Users and keys stay in auth's data: run twice, pick another username."""
        password = shlex.quote(str(self.home / "alice.password"))
        secret = f'{shlex.quote(str(self.home / "credentials"))}/"$TG_KEY".secret'
        try:
            address = ipaddress.ip_address(common.connect_host().strip("[]"))
            allow = f" --ip {address}/{address.max_prefixlen}"
        except ValueError:
            allow = ""
        return [
            "Place a SIGNED order: an operator creates a trader and an API key for them (the secret goes to a",
            "0600 file, shown nowhere); every order call is then signed with it (README: Signed requests):",
            f"  printf '' > {password} && chmod 600 {password} && \\",
            f"      printf '%s\\n' \"$(head -c 24 /dev/urandom | base64)\" >> {password}",
            "  export TG_USER=$(.venv/bin/tradeguard auth user create alice --account acct-1 --role trader \\",
            f"      --password-file {password} --quiet)",
            '  export TG_KEY=$(.venv/bin/tradeguard auth key create "$TG_USER" --scope orders:read \\',
            f"      --scope orders:write{allow} --save --quiet)",
            "  .venv/bin/tradeguard orders place --account acct-1 --client-order-id demo-1 \\",
            "      --symbol BTC-USD --side buy --type limit --quantity 0.5 --price 64000.25 \\",
            f'      --key-id "$TG_KEY" --secret-file {secret}',
            '  .venv/bin/tradeguard orders list --account acct-1 --key-id "$TG_KEY"',
            "",
            "Or as the trader in person: enrol TOTP (`tradeguard auth totp enroll alice`, then `… totp confirm alice",
            "CODE`), log in (`tradeguard auth login alice`) and add `--login alice` to the orders commands.",
            "",
        ]

    def banner(self) -> None:
        """Where each service listens and how to call it: commands that work as printed, from this
        directory, with the ports and home this suite actually uses."""
        d = self.paths
        exports = []
        if self.home != common.DEFAULT_HOME.resolve():
            exports.append(f"TRADEGUARD_HOME={self.home}")
        if common.host() != "127.0.0.1":
            exports.append(f"TRADEGUARD_HOST={common.host()}")
        for child in self.children.values():
            if child.port != child.service.port:
                exports.append(f"{registry.env_prefix(child.name)}_PORT={child.port}")
        lines = ["", "Tradeguard is up (Ctrl-C stops it):"]
        lines += [
            f"  {c.name:<9} {common.connect_host()}:{c.port}   metrics http://127.0.0.1:{c.metrics_port}/metrics"
            for c in self.children.values()
        ]
        lines.append("")
        if exports:
            lines += [
                "In another shell, first (the commands below read the same settings):",
                f"  export {' '.join(exports)}",
                "",
            ]
        if "auth" in self.children and "trading" in self.children:
            lines += self.signed_order_lines()
        lines += [
            "The key vault (administration as ops, key use as a service the policy allows, e.g. auth):",
            "  .venv/bin/tradeguard vault status",
            "  .venv/bin/tradeguard vault keys",
            "  printf 's3cret' | .venv/bin/tradeguard vault --as auth encrypt credentials --context user-1",
        ]
        if "ratelimit" in self.children:
            limits = os.environ.get(f"{registry.env_prefix('ratelimit')}_LIMITS_FILE", "").strip()
            lines += [
                "",
                f"Rate limits (README: Rate limits; the limits file {limits or self.home / 'config' / 'limits.yaml'}",
                "is re-read when it changes), as ops:",
                "  .venv/bin/tradeguard quota limits",
            ]
            if "auth" in self.children and "trading" in self.children:
                lines.append(
                    '  .venv/bin/tradeguard quota get "key:$TG_KEY" '
                    "--operation /tradeguard.trading.v1.TradingService/PlaceOrder"
                )
        audit = self.children.get("audit")
        if audit is not None:
            lines += [
                "",
                "The audit trail (README: Audit trail), as ops: the latest signed checkpoint",
                f"  grpcurl -cacert {d.ca_bundle} -cert {d.cert(common.OPERATOR)} -key {d.key(common.OPERATOR)} \\",
                f"      -authority audit {common.connect_host()}:{audit.port} "
                "tradeguard.audit.v1.AuditService/GetCheckpoint",
            ]
        trading = self.children.get("trading")
        if trading is not None:
            lines += [
                "",
                "Or with grpcurl:",
                f"  grpcurl -cacert {d.ca_bundle} -cert {d.cert(common.OPERATOR)} -key {d.key(common.OPERATOR)} \\",
                f"      -authority trading {common.connect_host()}:{trading.port} list",
            ]
        print("\n".join([*lines, ""]), flush=True)
