"""The monitor's API over mutual TLS (the real server, its audit service unreachable: the engine is fed directly):
ListAlerts filters and pages and refuses bad arguments, WatchAlerts sends the past ones then each new one once,
AcknowledgeAlert records who and refuses unknown ids and long notes, GetStatus reports the engine, and the
policy lets only ops call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.monitor.core.engine import Monitor
from services.monitor.model import Outcome
from services.monitor.service import SERVICE
from services.monitor.settings import Settings
from tests.services.monitor.conftest import event
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.monitor.v1 import monitor_pb2 as pb
from tradeguard.monitor.v1 import monitor_pb2_grpc
from tradeguard.testing import RunningService, rich_status, running_service

CONFIG = """
version: 1
auth_failures:
  window: 60s
  subjects:
    api_key: {threshold: 2, severity: critical, actions: [notify]}
    source_ip: {threshold: 2, severity: warning, actions: [notify]}
"""


@pytest.fixture
async def monitor(pki_paths: pki.PkiPaths, tmp_path: Path) -> AsyncIterator[RunningService[Settings, Any]]:
    home = pki_paths.home
    config = tmp_path / "monitor.yaml"
    config.write_text(CONFIG)
    settings = Settings(
        server=ServerConfig(name="monitor", port=0, home=home, grace_s=0),
        database_url=f"sqlite:///{home / 'data' / 'monitor.db'}",
        config_file=config,
        audit_target="127.0.0.1:1",  # nothing there: the test feeds the engine itself
        auth_target="127.0.0.1:1",
        kill_switch_credentials=None,
    )
    async with running_service(SERVICE, settings, pki_paths) as running:
        yield running


def burst(first: int, key: str, address: str) -> list[Any]:
    return [
        event(first + i, first + i, Outcome.DENIED_AUTHENTICATION, api_key_id=key, source_ip=address)
        for i in range(2)
    ]


async def test_list_filters_pages_and_refuses_bad_arguments(monitor: RunningService[Settings, Any]) -> None:
    engine = monitor.running.core
    assert isinstance(engine, Monitor)
    for i in range(3):
        await engine.process(burst(2 * i, f"k{i}", f"192.0.2.{i}"))  # each: an api_key and a source_ip alert
    async with monitor.channel() as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        everything = await stub.ListAlerts(pb.ListAlertsRequest(), timeout=10)
        assert len(everything.alerts) == 6 and everything.next_page_token == ""
        critical = await stub.ListAlerts(pb.ListAlertsRequest(min_severity=pb.SEVERITY_CRITICAL), timeout=10)
        assert sorted(a.subject for a in critical.alerts) == ["k0", "k1", "k2"]
        assert all(
            a.state == pb.ALERT_STATE_OPEN and a.actions[0].status == pb.ACTION_STATUS_DONE
            for a in critical.alerts
        )
        first = await stub.ListAlerts(pb.ListAlertsRequest(page_size=4), timeout=10)
        rest = await stub.ListAlerts(
            pb.ListAlertsRequest(page_size=4, page_token=first.next_page_token), timeout=10
        )
        assert [a.alert_id for a in [*first.alerts, *rest.alerts]] == [a.alert_id for a in everything.alerts]
        for request in (
            pb.ListAlertsRequest(page_size=1001),
            pb.ListAlertsRequest(page_token="x"),
            pb.ListAlertsRequest(state=pb.AlertState.ValueType(9)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListAlerts(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_sends_the_past_then_each_new_alert_once(monitor: RunningService[Settings, Any]) -> None:
    engine = monitor.running.core
    assert isinstance(engine, Monitor)
    await engine.process(burst(0, "k0", "192.0.2.0"))
    async with monitor.channel() as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        stream = stub.WatchAlerts(
            pb.WatchAlertsRequest(since=pb.Alert().raised_time, min_severity=pb.SEVERITY_CRITICAL)
        )
        past = await asyncio.wait_for(stream.read(), 10)
        assert isinstance(past, pb.WatchAlertsResponse)
        assert past.alert.subject == "k0"
        await engine.process(burst(2, "k1", "192.0.2.1"))
        new = await asyncio.wait_for(stream.read(), 10)
        assert isinstance(new, pb.WatchAlertsResponse)
        assert new.alert.subject == "k1"  # the source_ip alert (a warning) is not sent: below the minimum
        stream.cancel()


async def test_acknowledge_and_status(monitor: RunningService[Settings, Any]) -> None:
    engine = monitor.running.core
    assert isinstance(engine, Monitor)
    raised = await engine.process(burst(0, "k0", "192.0.2.0"))
    async with monitor.channel() as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        acked = await stub.AcknowledgeAlert(
            pb.AcknowledgeAlertRequest(alert_id=raised[0].alert_id, note="seen"), timeout=10
        )
        assert acked.alert.state == pb.ALERT_STATE_ACKNOWLEDGED and acked.alert.acknowledged_by.endswith(
            "/svc/ops"
        )
        assert acked.alert.acknowledged_time.seconds > 0
        for request, code in (
            (pb.AcknowledgeAlertRequest(alert_id="auth_failures-none"), grpc.StatusCode.NOT_FOUND),
            (
                pb.AcknowledgeAlertRequest(alert_id=raised[0].alert_id, note="x" * 1001),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (pb.AcknowledgeAlertRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AcknowledgeAlert(request, timeout=10)
            assert refused.value.code() == code
        status = await stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.position == 2 and status.events == 2 and status.open_alerts == 1
        assert {d.name: d.alerts for d in status.detectors}["auth_failures"] == 2
        assert len(status.config_sha256) == 64 and status.config_error == ""


async def test_only_operators_may_call(monitor: RunningService[Settings, Any]) -> None:
    async with monitor.channel("trading") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await monitor_pb2_grpc.MonitorServiceStub(channel).ListAlerts(pb.ListAlertsRequest(), timeout=10)
    assert rich_status(refused.value).code == grpc.StatusCode.PERMISSION_DENIED
