"""The monitor service, declared once: the kit's runner (tradeguard.service) turns this into a running server.

What `build` wires, in order:
- the configuration (`MonitorFile`: CONFIG_FILE, or the packaged default): loaded now, the service refuses to
  start on an invalid one (`ConfigUnavailable`, one line naming the file, line and field); a background task
  re-reads it when it changes (RELOAD_INTERVAL_S), keeping the last good one;
- the store the runner opened (SQLite by default, `$TRADEGUARD_HOME/data/monitor.db`; PostgreSQL by URL) and the
  position in it;
- channels as workload `monitor`: to the audit service (the tail's, made afresh per connection; and the recorder
  of the monitor's own actions), to the auth service (revocations), to the trading service signed with the monitor's API
  key when it has one (the kill switch);
- the engine (services/monitor/core/engine.py: detectors with the offline GeoIP locator, budgets, outbox) and the
  tail follower (services/monitor/tail.py) as a background task: it first carries out the actions a crash left
  pending, then follows the audit log from the stored position;
- the servicer (ListAlerts, WatchAlerts, AcknowledgeAlert, GetStatus).

At shutdown (closers, in reverse order): the recorder's queued events are sent, then the channels close; the
runner closes the store last.
"""

from __future__ import annotations

import contextlib
from typing import Final

import grpc

from services.monitor import policy
from services.monitor.actions import Actions, load_credentials
from services.monitor.config_file import MonitorFile
from services.monitor.core.config import ConfigError
from services.monitor.core.engine import Detectors, Monitor
from services.monitor.geoip import GeoLocator
from services.monitor.servicer import MonitorServicer
from services.monitor.settings import Settings
from services.monitor.store import MonitorStore
from services.monitor.store_postgres import PostgresMonitorStore
from services.monitor.store_sqlite import SqliteMonitorStore
from services.monitor.tail import TailFollower
from tradeguard.audit.recorder import Recorder
from tradeguard.guard.client import authenticated_channel, signing_interceptors
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.monitor.v1 import monitor_pb2_grpc
from tradeguard.service import Assembly, Closer, Declaration, Stores, Wiring
from tradeguard.storage import clock_us

__all__ = ["SERVICE", "SUMMARY", "ConfigUnavailable", "build"]

SUMMARY: Final = (
    "The monitor: anomaly detection on the audit log's tail (rate baselines, geography, failed-authentication "
    "bursts, permission scans, risk rejections), alerts, automatic key revocation and kill switch."
)


class ConfigUnavailable(RuntimeError):
    """The configuration file is invalid or unreadable at start-up: the service does not start."""


def tail_channel(settings: Settings) -> grpc.aio.Channel:
    """A plain mutual-TLS channel to the audit service as workload `monitor` (see services/monitor/tail.py)."""
    return grpc.aio.secure_channel(
        settings.audit_target,
        tls.channel_credentials(settings.server.workload),
        options=[
            ("grpc.ssl_target_name_override", settings.audit_server_name),
            ("grpc.default_authority", settings.audit_server_name),
            ("grpc.keepalive_time_ms", 30_000),
        ],
    )


def load_config(settings: Settings) -> MonitorFile:
    try:
        return MonitorFile(settings.config_file, clock_us)
    except ConfigError as error:
        raise ConfigUnavailable(f"the configuration is refused: {error}") from None


async def build(wiring: Wiring[Settings, MonitorStore]) -> Assembly:
    settings, store = wiring.settings, wiring.store
    config = load_config(settings)
    workload = settings.server.workload
    closers: list[Closer] = []
    try:
        credentials = load_credentials(settings.kill_switch_credentials)
        audit_channel = MeshChannel(settings.audit_target, settings.audit_server_name, workload)
        closers.append(audit_channel.close)
        auth_channel = MeshChannel(settings.auth_target, settings.auth_server_name, workload)
        closers.append(auth_channel.close)
        trading_channel = None
        if credentials is not None:
            signed = authenticated_channel(
                settings.trading_target,
                settings.trading_server_name,
                workload,
                signing_interceptors(credentials),
            )
            trading_channel = signed

            async def close_trading() -> None:
                await signed.close(None)

            closers.append(close_trading)
        recorder = Recorder(audit_channel, name="monitor-audit")
        closers.append(recorder.close)  # its queued events sent before the channels close
        actions = Actions(
            auth=auth_channel,
            trading=trading_channel,
            recorder=recorder,
            webhook_url=settings.webhook_url,
            webhook_secret=settings.webhook_secret,
            syslog_target=settings.syslog_target,
            clock_us=clock_us,
        )
        detectors = Detectors(lambda: config.current, GeoLocator().locate)
        monitor = Monitor(store, detectors, actions, clock_us)
        monitor.position, monitor.last_record_us = await store.position()
        follower = TailFollower(
            lambda: tail_channel(settings),
            monitor,
            max_batch=settings.max_batch,
            replay=settings.replay_entries,
        )
        servicer = MonitorServicer(monitor, config, max_watchers=settings.watchers)
    except BaseException:
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                await closer()
        raise

    async def follow_audit_log() -> None:
        await monitor.open()  # the actions a crash left pending, then the stored position
        await follower.run()

    async def watch_config() -> None:
        await config.watch(settings.reload_interval_s)

    return Assembly(servicer, tasks=[follow_audit_log, watch_config], closers=closers, core=monitor)


SERVICE: Declaration[Settings, MonitorStore] = Declaration(
    name="monitor",
    summary=SUMMARY,
    register=monitor_pb2_grpc.add_MonitorServiceServicer_to_server,
    rules=policy.RULES,
    settings=Settings.read,
    stores=Stores(sqlite=SqliteMonitorStore.open, postgres=PostgresMonitorStore.open),
    build=build,
)
