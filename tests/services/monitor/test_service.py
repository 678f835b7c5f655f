"""The monitor end to end against the REAL suite (the session's key vault, auth and audit processes; the trading
service in process behind its guard): the monitor, started as production starts it, follows the real audit
log from its end and acts through the real auth service.

Replayed synthetic traffic (appended to the audit log as the `echo` workload, a recorder there) and real traffic
(logins refused by the auth service, calls with forged signatures refused by the trading service's guard):
- a normal burst of traffic for 50 keys raises nothing;
- a volume spike from one key raises `rate_spike` and revokes the key;
- a key used from a new country, then from the other side of the world a minute later, raises `new_country` and
  `impossible_travel` and the key is revoked;
- a burst of failed logins raises `auth_failures` for the user; a burst of forged signatures for a key raises it
  for the key and revokes it;
each within 5 s of the triggering event (measured: from just before the triggering append or call to the action
DONE in the monitor's store), the revoked keys refused by the trading service afterwards, and every action
recorded in the audit log with its evidence. A restart of the monitor in the middle reads on from its position:
no alert and no action repeated, and what happens while it is down is caught once it is back.

The figures (detection delays, alert counts) are printed (`-s` shows them) and kept as user properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.monitor.model import ActionStatus as Status
from services.monitor.service import SERVICE
from services.monitor.settings import Settings
from services.monitor.store_sqlite import SqliteMonitorStore
from tests.conftest import RunningTrading
from tests.support import AUTH_PASSWORD, AuthServices, create_api_key, create_auth_user
from tradeguard.audit.v1 import audit_pb2 as apb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.auth.v1 import auth_pb2, auth_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.monitor.v1 import monitor_pb2 as pb
from tradeguard.monitor.v1 import monitor_pb2_grpc
from tradeguard.testing import RunningService, running_service
from tradeguard.trading.v1 import trading_pb2

DEADLINE_S = 5.0  # MiFID II RTS 6: alerts within 5 s
GB, JP = "81.2.69.160", "1.0.16.1"  # geoip2fast: United Kingdom, Japan

CONFIG = """
version: 1
exclude_recorders: [monitor]
budgets: {notify: 1000, revoke_key: 50, kill_switch: 5}
rate_spike:
  bucket: 1s
  alpha: 0.2
  warmup_buckets: 10
  sigmas: 6
  subjects:
    api_key: {threshold: 30, severity: critical, actions: [notify, revoke_key]}
geography:
  new_country: {severity: warning, actions: [notify]}
  impossible_travel: {severity: critical, actions: [notify, revoke_key]}
auth_failures:
  window: 60s
  subjects:
    api_key: {threshold: 5, severity: critical, actions: [notify, revoke_key]}
    principal: {threshold: 5, severity: warning, actions: [notify]}
"""


_RUN = uuid.uuid4().hex[:12]
_IDS = itertools.count()  # event ids: not random UUIDs (the audit service refuses ids that look like secrets)


def now_us() -> int:
    return time.time_ns() // 1000


def synthetic(time_us: int, **fields: Any) -> apb.Event:
    return apb.Event(
        event_id=f"monitor-test.{_RUN}.{next(_IDS)}",
        time=Timestamp(seconds=time_us // 1_000_000, nanos=time_us % 1_000_000 * 1000),
        method=fields.pop("method", "/tradeguard.trading.v1.TradingService/PlaceOrder"),
        action=fields.pop("action", "orders:write"),
        outcome=fields.pop("outcome", apb.OUTCOME_OK),
        status_code=fields.pop("status_code", "OK"),
        **fields,
    )


async def append(auth: AuthServices, events: list[apb.Event]) -> int:
    """Append `events` as the `echo` workload (in batches of 1,000); the last one's sequence."""
    last = -1
    async with auth.audit_channel("echo") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for i in range(0, len(events), 1000):
            reply = await stub.AppendBatch(apb.AppendBatchRequest(events=events[i : i + 1000]), timeout=30)
            last = reply.appended[-1].sequence
    return last


async def log_end(auth: AuthServices) -> int:
    """The next sequence of the audit log (a marker appended to find it)."""
    return await append(auth, [synthetic(now_us(), resource="monitor-test-marker")]) + 1


class Monitor:
    """The running monitor and how the test reads it."""

    def __init__(self, service: RunningService[Settings, Any]) -> None:
        self.service = service

    @property
    def engine(self) -> Any:
        return self.service.running.core

    async def alerts(self, **query: Any) -> list[pb.Alert]:
        async with self.service.channel("ops") as channel:
            reply = await monitor_pb2_grpc.MonitorServiceStub(channel).ListAlerts(
                pb.ListAlertsRequest(page_size=1000, **query), timeout=10
            )
        return list(reply.alerts)

    async def until(self, found: Callable[[list[pb.Alert]], bool], within_s: float = 30.0) -> list[pb.Alert]:
        """Poll ListAlerts until `found(alerts)` (each 10 ms); the alerts then."""
        async with asyncio.timeout(within_s):
            while True:
                alerts = await self.alerts()
                if found(alerts):
                    return alerts
                await asyncio.sleep(0.01)

    async def caught_up(self, sequence: int) -> None:
        async with asyncio.timeout(30):
            while self.engine.position <= sequence:  # noqa: ASYNC110 - the engine's position has no event
                await asyncio.sleep(0.01)


def acted(alerts: list[pb.Alert], detector: str, subject: str, kind: int) -> pb.Alert | None:
    for alert in alerts:
        if alert.detector == detector and alert.subject == subject:
            for action in alert.actions:
                if action.kind == kind and action.status == pb.ACTION_STATUS_DONE:
                    return alert
    return None


def settings_for(paths: pki.PkiPaths, auth: AuthServices, home: Path, replay: int = 0) -> Settings:
    config = home / "monitor.yaml"
    config.write_text(CONFIG)
    return Settings(
        server=ServerConfig(name="monitor", port=0, home=home, grace_s=0),
        database_url=f"sqlite:///{home / 'data' / 'monitor.db'}",
        config_file=config,
        audit_target=auth.audit_target,
        auth_target=auth.auth_target,
        kill_switch_credentials=None,
        replay_entries=replay,
    )


async def start_at_log_end(paths: pki.PkiPaths, auth: AuthServices) -> None:
    """The session's log holds every other test's traffic: the test's monitor starts at its end."""
    store = await SqliteMonitorStore.open(paths.home / "data" / "monitor.db")
    await store.commit(await log_end(auth), 0, [])
    await store.close()


@contextlib.asynccontextmanager
async def started(paths: pki.PkiPaths, auth: AuthServices, replay: int = 0) -> AsyncIterator[Monitor]:
    """The monitor (in process, as production starts it) on the test's database; stopped on exit."""
    async with running_service(SERVICE, settings_for(paths, auth, paths.home, replay), paths) as running:
        yield Monitor(running)


@pytest.fixture
async def monitor(pki_paths: pki.PkiPaths, auth_services: AuthServices) -> AsyncIterator[Monitor]:
    await start_at_log_end(pki_paths, auth_services)
    async with started(pki_paths, auth_services) as running:
        yield running


async def refused(trading: RunningTrading, key: ApiKeyCredentials) -> bool:
    trading.key = key
    try:
        async with trading.channel() as channel:
            await trading.stub(channel).PlaceOrder(
                trading_pb2.PlaceOrderRequest(
                    account_id="acct-1",
                    client_order_id=f"mon-{uuid.uuid4().hex[:12]}",
                    symbol="BTC-USD",
                    side=trading_pb2.SIDE_BUY,
                    type=trading_pb2.ORDER_TYPE_LIMIT,
                    quantity="1",
                    price="100",
                ),
                timeout=10,
            )
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


async def key_state(auth: AuthServices, user_id: str, key_id: str) -> int:
    async with auth.channel("ops") as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).ListApiKeys(
            auth_pb2.ListApiKeysRequest(user_id=user_id), timeout=10
        )
    return next(k.state for k in reply.keys if k.key_id == key_id)


async def recorded_actions(auth: AuthServices, key_id: str) -> list[apb.StoredEntry]:
    async with auth.audit_channel("ops") as channel:
        reply = await audit_pb2_grpc.AuditServiceStub(channel).Query(
            apb.QueryRequest(api_key_id=key_id, page_size=1000), timeout=10
        )
    return [e for e in reply.entries if e.entry.event.action.startswith("monitor.")]


async def test_replayed_attacks_are_detected_and_acted_on_within_5_s(
    monitor: Monitor, trading: RunningTrading, auth_services: AuthServices, record_property: Any
) -> None:
    auth = auth_services
    figures: dict[str, float] = {}

    # --- a normal burst of traffic for 50 keys: nothing ------------------------------------------------------
    start = now_us() - 60_000_000
    normal = [
        synthetic(
            start + second * 1_000_000 + k * 10_000,
            api_key_id=f"tgk_normal{k:02d}",
            account_id=f"acct-n{k}",
            source_ip=GB,
        )
        for second in range(60)
        for k in range(50)
        if (second + k) % 3 == 0  # each key about every 3 s, interleaved
    ]
    last = await append(auth, normal)
    await monitor.caught_up(last)
    assert await monitor.alerts() == []
    figures["normal_events"] = len(normal)

    # --- a volume spike from one key ------------------------------------------------------------------------
    user = await create_auth_user(auth, "acct-1")
    spiky = await create_api_key(auth, user.user_id)
    base = now_us() - 25_000_000
    history = [synthetic(base + i * 500_000, api_key_id=spiky.key_id, account_id="acct-1") for i in range(40)]
    await monitor.caught_up(await append(auth, history))
    assert not await refused(trading, spiky)  # the key works (its order, recorded by the guard, counts too)
    sent = time.perf_counter()
    await append(auth, [synthetic(now_us(), api_key_id=spiky.key_id, account_id="acct-1") for _ in range(60)])
    alerts = await monitor.until(
        lambda a: acted(a, "rate_spike", spiky.key_id, pb.ACTION_KIND_REVOKE_KEY) is not None
    )
    figures["rate_spike_s"] = time.perf_counter() - sent
    spike = acted(alerts, "rate_spike", spiky.key_id, pb.ACTION_KIND_REVOKE_KEY)
    assert spike is not None and int(spike.evidence["count"]) >= 30
    assert await key_state(auth, user.user_id, spiky.key_id) == auth_pb2.API_KEY_STATE_REVOKED
    await _eventually_refused(trading, spiky)

    # --- a new country, then impossible travel ----------------------------------------------------------------
    traveller = await create_api_key(auth, user.user_id)
    await monitor.caught_up(
        await append(
            auth,
            [
                synthetic(
                    now_us() - 60_000_000, api_key_id=traveller.key_id, account_id="acct-1", source_ip=GB
                )
            ],
        )
    )
    sent = time.perf_counter()
    await append(auth, [synthetic(now_us(), api_key_id=traveller.key_id, account_id="acct-1", source_ip=JP)])
    alerts = await monitor.until(
        lambda a: (
            acted(a, "impossible_travel", traveller.key_id, pb.ACTION_KIND_REVOKE_KEY) is not None
            and acted(a, "new_country", traveller.key_id, pb.ACTION_KIND_NOTIFY) is not None
        )
    )
    figures["impossible_travel_s"] = time.perf_counter() - sent
    travel = acted(alerts, "impossible_travel", traveller.key_id, pb.ACTION_KIND_REVOKE_KEY)
    assert travel is not None and (travel.evidence["from_country"], travel.evidence["to_country"]) == (
        "GB",
        "JP",
    )
    assert travel.severity == pb.SEVERITY_CRITICAL
    await _eventually_refused(trading, traveller)

    # --- a burst of failed logins (real: refused by the auth service) ---------------------------------------
    victim = await create_auth_user(auth, "acct-1")
    async with auth.channel("ops") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        for attempt in range(5):
            if attempt == 4:
                sent = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Login(
                    auth_pb2.LoginRequest(username=victim.username, password=AUTH_PASSWORD + "x"), timeout=10
                )
    alerts = await monitor.until(
        lambda a: acted(a, "auth_failures", victim.username, pb.ACTION_KIND_NOTIFY) is not None
    )
    figures["failed_logins_s"] = time.perf_counter() - sent
    logins = acted(alerts, "auth_failures", victim.username, pb.ACTION_KIND_NOTIFY)
    assert logins is not None and logins.evidence["last_action"] == "login"

    # --- a burst of forged signatures (real: refused by the trading service's guard) ------------------------
    target = await create_api_key(auth, user.user_id)
    assert target.secret is not None
    forged = ApiKeyCredentials(
        target.key_id, secret=target.secret[:-4] + ("AAAA" if not target.secret.endswith("AAAA") else "BBBB")
    )
    for attempt in range(5):
        if attempt == 4:
            sent = time.perf_counter()
        assert await refused(trading, forged)
    alerts = await monitor.until(
        lambda a: acted(a, "auth_failures", target.key_id, pb.ACTION_KIND_REVOKE_KEY) is not None
    )
    figures["forged_signatures_s"] = time.perf_counter() - sent
    assert await key_state(auth, user.user_id, target.key_id) == auth_pb2.API_KEY_STATE_REVOKED

    # --- every action recorded in the audit log with its evidence --------------------------------------------
    for key in (spiky, traveller, target):
        entries = await recorded_actions(auth, key.key_id)
        revocations = [e for e in entries if e.entry.event.action == "monitor.revoke_key"]
        assert len(revocations) == 1, key.key_id
        event = revocations[0].entry.event
        assert event.outcome == apb.OUTCOME_OK and event.resource == key.key_id
        assert event.details["alert_id"] and event.details["sequences"] and event.details["status"] == "done"
        assert event.method == "/tradeguard.auth.v1.AuthService/RevokeApiKey"
        assert revocations[0].entry.recorder.endswith("/svc/monitor")

    # --- the figures ------------------------------------------------------------------------------------------
    alerts = await monitor.alerts()
    figures["alerts"] = len(alerts)
    print("\nmonitor end to end:", {k: round(v, 3) for k, v in figures.items()})
    for name, value in figures.items():
        record_property(name, value)
    for name in ("rate_spike_s", "impossible_travel_s", "failed_logins_s", "forged_signatures_s"):
        assert figures[name] <= DEADLINE_S, (name, figures[name])
    # nothing but the attacks: spike, new country + travel, the logins, the forged key
    assert sorted((a.detector, a.subject) for a in alerts) == sorted(
        [
            ("rate_spike", spiky.key_id),
            ("new_country", traveller.key_id),
            ("impossible_travel", traveller.key_id),
            ("auth_failures", victim.username),
            ("auth_failures", target.key_id),
        ]
    )
    status = Status.DONE  # every action DONE
    assert all(action.status == int(status) for alert in alerts for action in alert.actions)


async def _eventually_refused(trading: RunningTrading, key: ApiKeyCredentials) -> None:
    """The trading service refuses the revoked key (the revocation is pushed to its guard)."""
    async with asyncio.timeout(10):
        while not await refused(trading, key):  # noqa: ASYNC110 - a refusal has no event to wait on
            await asyncio.sleep(0.01)


async def forge(trading: RunningTrading, key: ApiKeyCredentials, times: int) -> None:
    """`times` calls signed with a wrong secret for `key` (each refused: DENIED_AUTHENTICATION in the log)."""
    assert key.secret is not None
    wrong = key.secret[:-4] + ("AAAA" if not key.secret.endswith("AAAA") else "BBBB")
    for _ in range(times):
        assert await refused(trading, ApiKeyCredentials(key.key_id, secret=wrong))


async def test_a_restart_in_the_middle_neither_misses_nor_repeats_an_action(
    pki_paths: pki.PkiPaths, trading: RunningTrading, auth_services: AuthServices
) -> None:
    auth = auth_services
    user = await create_auth_user(auth, "acct-1")
    before = await create_api_key(auth, user.user_id)
    during = await create_api_key(auth, user.user_id)
    straddling = await create_api_key(auth, user.user_id)
    await start_at_log_end(pki_paths, auth)
    async with started(pki_paths, auth, replay=10_000) as first:
        await forge(trading, before, 5)
        await first.until(
            lambda a: acted(a, "auth_failures", before.key_id, pb.ACTION_KIND_REVOKE_KEY) is not None
        )
        await forge(trading, straddling, 2)  # 2 of the 5 failures before the restart...
        await first.caught_up(await log_end(auth) - 1)
    # down: a whole burst happens meanwhile
    await forge(trading, during, 5)
    async with started(pki_paths, auth, replay=10_000) as second:
        await forge(trading, straddling, 3)  # ...and 3 after it: one burst
        alerts = await second.until(
            lambda a: all(
                acted(a, "auth_failures", key.key_id, pb.ACTION_KIND_REVOKE_KEY) is not None
                for key in (during, straddling)
            )
        )
        await second.caught_up(await log_end(auth) - 1)
        alerts = await second.alerts()
    assert sorted(a.subject for a in alerts) == sorted(k.key_id for k in (before, during, straddling))
    for key in (before, during, straddling):
        assert await key_state(auth, user.user_id, key.key_id) == auth_pb2.API_KEY_STATE_REVOKED
        revocations = [
            e
            for e in await recorded_actions(auth, key.key_id)
            if e.entry.event.action == "monitor.revoke_key"
        ]
        assert len(revocations) == 1, key.key_id  # once, across the restart
