"""A guard in a few lines: its settings, what it guards, and `guard_for` that wires it all.

    guard = guard_for(
        GuardConfig(services=["acme.desk.v1.DeskService"],
                    permissions={"/acme.desk.v1.DeskService/Quote": "orders:read"}),
        workload=tls.Workload.of(paths, "desk"), trust_domain=pki.trust_domain(paths))
    server = MeshServer(config, policy, services, layers=[guard.layer])
    async with guard:          # the revocation stream and JWKS refresh run while the server serves
        await server.start(); ...

A service run by the kit's runner only declares `permissions=` (tradeguard.service.Declaration) and has a `guard`
field in its settings (`GuardSettings.read(env)`): `start()` mounts the guard itself.

Settings, under the service's own prefix (`TRADEGUARD_<NAME>_`): `AUTH_TARGET` (host:port of the auth service,
default 127.0.0.1:50051), `JWT_ISSUER` (default `tradeguard-auth`), `JWT_AUDIENCE` (default
`tradeguard`), `JWT_LEEWAY_S` (default 5, at most 60), `REVOCATION_MAX_OUTAGE_S` (default 5, at most 60: how long
verified JWTs are still accepted while the revocation stream is down), `TOKEN_CACHE_SIZE` (default 10,000);
the quota stage (tradeguard.guard.quota): `QUOTA` (default true: every verified call not listed `unmetered` is
counted by the rate-limit service, fail closed), `RATELIMIT_TARGET` (host:port of the rate-limit service, default
127.0.0.1:50052). The guard calls the rate-limit service as its own workload, which that service must let call
CheckQuotaBatch (TRADEGUARD_RATELIMIT_GUARD_WORKLOADS); the audit stage (tradeguard.guard.audit): `AUDIT` (default
true: every call of a guarded method is recorded by the audit service, fail closed: no audit, no call),
`AUDIT_TARGET` (host:port of the audit service, default 127.0.0.1:50053), `AUDIT_SERVER_NAME` (default
`audit`), which must let the guard's workload
record (AppendBatch: trading, auth, keyvault, ratelimit, and TRADEGUARD_AUDIT_GUARD_WORKLOADS);
`BATCH_FILL_TURNS` (default 25, at most 100): how many event-loop turns a signed-request, quota or audit batch
that is not full waits for more calls before it is sent (tradeguard.batching `fill_turns`: larger batches under
load for a few microseconds of latency; 0 sends at once); `BATCH_FILL_PATIENCE` (default 0, no limit; at most
100): N sends such a batch once N turns in a row brought no new call (sooner at moderate load, smaller batches at
saturation: 2 gave batches of 8.5 instead of 12 at 64 callers); `AUDIT_WRITE_AHEAD` (default true): the methods a
service declares as taking effect (`Declaration.effect_methods`) run their handler only once their accepted event
is acknowledged, so that a crash of the service never leaves an effect (a stored order) without its event; false
appends beside the handler for every method (lower latency; a kill -9 may then leave the last few effects
unrecorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final

from tradeguard.audit.recording import RecordingSettings
from tradeguard.guard.audit import DEFAULT_FILL_PATIENCE, DEFAULT_FILL_TURNS, AuditStage
from tradeguard.guard.auth_client import AuthClient
from tradeguard.guard.jwt import (
    DEFAULT_ALGORITHMS,
    DEFAULT_CACHE_SIZE,
    DEFAULT_LEEWAY_S,
    JwksCache,
    JwtVerifier,
)
from tradeguard.guard.layer import Guard
from tradeguard.guard.quota import QuotaStage
from tradeguard.guard.revocations import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_OUTAGE_S,
    MAX_OUTAGE_S,
    RevocationSet,
    RevocationWatcher,
)
from tradeguard.guard.signed import SignedVerifier
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.registry import lookup
from tradeguard.settings import Env

__all__ = ["GuardConfig", "GuardSettings", "MountedGuard", "guard_for"]

DEFAULT_ISSUER: Final = "tradeguard-auth"  # the auth service's defaults (services/auth/settings.py)
DEFAULT_AUDIENCE: Final = "tradeguard"
JWKS_REFRESH_S: Final = 300.0


@dataclass(frozen=True)
class GuardSettings:
    """How a guard reaches and trusts the auth service (see the module for the variables)."""

    auth_target: str = f"127.0.0.1:{lookup('auth').port}"
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_s: float = DEFAULT_LEEWAY_S
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S
    token_cache_size: int = DEFAULT_CACHE_SIZE
    max_revocations: int = DEFAULT_MAX_ENTRIES
    auth_server_name: str = "auth"
    ratelimit_target: str = f"127.0.0.1:{lookup('ratelimit').port}"
    quota: bool = True
    ratelimit_server_name: str = "ratelimit"
    audit_target: str = f"127.0.0.1:{lookup('audit').port}"
    audit: bool = True
    audit_server_name: str = "audit"
    fill_turns: int = DEFAULT_FILL_TURNS
    fill_patience: int = DEFAULT_FILL_PATIENCE
    audit_write_ahead: bool = True

    @classmethod
    def read(cls, env: Env) -> GuardSettings:
        audit = RecordingSettings.read(env)  # AUDIT, AUDIT_TARGET, AUDIT_SERVER_NAME: as every recorder's
        return cls(
            auth_target=env.text("AUTH_TARGET", cls.auth_target),
            issuer=env.text("JWT_ISSUER", DEFAULT_ISSUER),
            audience=env.text("JWT_AUDIENCE", DEFAULT_AUDIENCE),
            leeway_s=env.number("JWT_LEEWAY_S", DEFAULT_LEEWAY_S, low=0.0, high=60.0),
            max_outage_s=env.number(
                "REVOCATION_MAX_OUTAGE_S", DEFAULT_MAX_OUTAGE_S, low=0.0, high=MAX_OUTAGE_S
            ),
            token_cache_size=env.integer("TOKEN_CACHE_SIZE", DEFAULT_CACHE_SIZE, low=0, high=1_000_000),
            ratelimit_target=env.text("RATELIMIT_TARGET", cls.ratelimit_target),
            quota=env.flag("QUOTA", True),
            audit_target=audit.target,
            audit=audit.enabled,
            audit_server_name=audit.server_name,
            fill_turns=env.integer("BATCH_FILL_TURNS", DEFAULT_FILL_TURNS, low=0, high=100),
            fill_patience=env.integer("BATCH_FILL_PATIENCE", DEFAULT_FILL_PATIENCE, low=0, high=100),
            audit_write_ahead=env.flag("AUDIT_WRITE_AHEAD", True),
        )


@dataclass(frozen=True)
class GuardConfig:
    """What a guard guards: its services (full gRPC names), each method's permission, the public methods, and the
    guarded methods its quota stage does not count (`unmetered`), and the guarded methods that take effect (change
    state: an order placed or cancelled, a limit set), whose accepted event is acknowledged before the handler runs
    unless the settings' `audit_write_ahead` is off (`effects`; tradeguard.guard.audit)."""

    services: Collection[str]
    permissions: Mapping[str, str]
    public: Collection[str] = ()
    unmetered: Collection[str] = ()
    effects: Collection[str] = ()
    settings: GuardSettings = field(default_factory=GuardSettings)


class MountedGuard:
    """A guard with what it runs on: `layer` for the server's chain, `run()` (the revocation stream and the
    periodic JWKS refresh) as a background task, `close()` at shutdown (the quota and audit stages' batchers and
    channels too). Also an async context manager that runs and closes it."""

    def __init__(
        self,
        layer: Guard,
        *,
        channel: MeshChannel,
        auth: AuthClient,
        jwks: JwksCache,
        revocations: RevocationSet,
        watcher: RevocationWatcher,
        signed: SignedVerifier,
        quota: QuotaStage | None = None,
        quota_channel: MeshChannel | None = None,
        audit: AuditStage | None = None,
        audit_channel: MeshChannel | None = None,
    ) -> None:
        self.layer = layer
        self.channel = channel
        self.auth = auth
        self.jwks = jwks
        self.revocations = revocations
        self.watcher = watcher
        self.signed = signed
        self.quota = quota
        self.quota_channel = quota_channel
        self.audit = audit
        self.audit_channel = audit_channel
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """The guard's background work, until cancelled: the revocation stream, and the JWKS refreshed at once
        and every 5 minutes (so a withdrawn key stops verifying; new kids also refresh on first sight)."""
        watching = asyncio.create_task(self.watcher.run(), name="guard-revocations")
        try:
            while True:
                await self.jwks.refresh()
                await asyncio.sleep(JWKS_REFRESH_S)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.signed.close()
        if self.quota is not None:
            await self.quota.close()
        await self.channel.close()
        if self.quota_channel is not None:
            await self.quota_channel.close()
        if self.audit is not None:
            await self.audit.close()  # the events still queued are sent first
        if self.audit_channel is not None:
            await self.audit_channel.close()

    async def __aenter__(self) -> MountedGuard:
        self._task = asyncio.create_task(self.run(), name="guard")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def guard_for(
    config: GuardConfig,
    *,
    workload: tls.Workload,
    trust_domain: str,
    clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
) -> MountedGuard:
    """A guard for `config`, calling the auth service (the rate-limit service unless `settings.quota` is off,
    the audit service unless `settings.audit` is off) as `workload` (the guarded service's own certificate)."""
    settings = config.settings
    channel = MeshChannel(settings.auth_target, settings.auth_server_name, workload)
    auth = AuthClient(channel)
    revocations = RevocationSet(
        clock_us, max_entries=settings.max_revocations, max_outage_s=settings.max_outage_s
    )
    jwks = JwksCache(auth.jwks, algorithms=settings.algorithms)
    verifier = JwtVerifier(
        jwks,
        settings.issuer,
        settings.audience,
        revocations=revocations,
        algorithms=settings.algorithms,
        leeway_s=settings.leeway_s,
        clock_us=clock_us,
        cache_size=settings.token_cache_size,
    )
    fill = {"fill_turns": settings.fill_turns, "fill_patience": settings.fill_patience}
    signed = SignedVerifier(auth.verify_batch, revocations, **fill)
    quota_channel = (
        MeshChannel(settings.ratelimit_target, settings.ratelimit_server_name, workload)
        if settings.quota
        else None
    )
    quota = QuotaStage(quota_channel, **fill) if quota_channel is not None else None
    audit_channel = (
        MeshChannel(settings.audit_target, settings.audit_server_name, workload) if settings.audit else None
    )
    audit = AuditStage(audit_channel, clock_us=clock_us, **fill) if audit_channel is not None else None
    layer = Guard(
        trust_domain=trust_domain,
        services=config.services,
        permissions=config.permissions,
        public=config.public,
        jwt=verifier,
        signed=signed,
        revocations=revocations,
        quota=quota,
        unmetered=config.unmetered,
        audit=audit,
        write_ahead=config.effects if settings.audit_write_ahead else (),
    )
    watcher = RevocationWatcher(revocations, auth)
    return MountedGuard(
        layer,
        channel=channel,
        auth=auth,
        jwks=jwks,
        revocations=revocations,
        watcher=watcher,
        signed=signed,
        quota=quota,
        quota_channel=quota_channel,
        audit=audit,
        audit_channel=audit_channel,
    )
