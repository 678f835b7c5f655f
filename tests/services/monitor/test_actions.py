"""The monitor's actions: its API-key file for the kill switch (absent: the action is skipped; readable by others or
out of shape: refused, the service does not start); a notification as a signed webhook POST (checked by a real
HTTP receiver) and an RFC 5424 datagram (a real UDP socket), a failing receiver making the action FAILED; the kill
switch engaged at a key's scope through the real trading service (its open order cancelled, new ones refused,
engaging again harmless)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from services.monitor import notify
from services.monitor.actions import Actions, load_credentials
from services.monitor.model import ActionKind, ActionRecord, ActionStatus, Alert, Finding, Severity
from tests.conftest import RunningTrading
from tests.support import create_api_key, create_auth_user
from tradeguard.audit.recorder import Recorder
from tradeguard.guard.client import authenticated_channel, signing_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.rpc.status import rich_status
from tradeguard.trading.v1 import trading_pb2

KEY_ID = "tgk_gdkniBsblHGWTJ6lyotTomU8F8jXK66t1dxrre"  # a well-formed key id (its checksum valid)


def test_the_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "monitor-key.json"
    assert load_credentials(path) is None and load_credentials(None) is None
    path.write_text(json.dumps({"key_id": KEY_ID, "secret": "tgs_y"}))
    path.chmod(0o600)
    credentials = load_credentials(path)
    assert credentials is not None and (credentials.key_id, credentials.secret) == (KEY_ID, "tgs_y")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="owner only"):
        load_credentials(path)
    path.chmod(0o600)
    path.write_text(json.dumps({"key_id": KEY_ID}))
    with pytest.raises(ValueError, match="must hold"):
        load_credentials(path)
    path.write_text(json.dumps({"key_id": "tgk_forged", "secret": "tgs_y"}))
    with pytest.raises(ValueError, match="not an API key id"):
        load_credentials(path)


# --- carrying actions out ------------------------------------------------------------------------------------------


def sample_alert(kind: ActionKind, target: str) -> Alert:
    finding = Finding(
        detector="risk_rejections", severity=Severity.CRITICAL, subject_kind="api_key", subject=target,
        window_us=1, summary=f"api_key {target}: 20 orders refused by risk checks within 60 s",
        event_time_us=1_800_000_000_000_000, evidence={"count": "20"}, sequences=(1, 2), api_key_id=target,
        actions=(kind,), kill_scope="api_key",
    )  # fmt: skip
    return Alert(
        finding.alert_id,
        finding,
        1_800_000_000_000_001,
        actions=(ActionRecord(kind, "", ActionStatus.PENDING),),
    )


def actions_for(paths: pki.PkiPaths, **kwargs: Any) -> Actions:
    nowhere = MeshChannel("127.0.0.1:1", "auth", tls.Workload.of(paths, "monitor"))
    return Actions(
        auth=kwargs.pop("auth", nowhere),
        trading=kwargs.pop("trading", None),
        recorder=Recorder(MeshChannel("127.0.0.1:1", "audit", tls.Workload.of(paths, "monitor"))),
        clock_us=lambda: 1_800_000_000_000_002,
        **kwargs,
    )


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    status: ClassVar[int] = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Hook.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(_Hook.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


async def test_notify_posts_a_signed_webhook_and_a_syslog_datagram(pki_paths: pki.PkiPaths) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    try:
        secret = "a-webhook-secret-0123"
        actions = actions_for(
            pki_paths,
            webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook",
            webhook_secret=secret,
            syslog_target=f"127.0.0.1:{receiver.getsockname()[1]}",
        )
        alert = sample_alert(ActionKind.NOTIFY, "tgk_x")
        assert await actions.act(
            alert, ActionRecord(ActionKind.NOTIFY, "api_key:tgk_x", ActionStatus.PENDING)
        ) == (
            ActionStatus.DONE,
            "",
        )
        headers, body = _Hook.received[-1]
        assert (
            json.loads(body)["alert_id"] == alert.alert_id
            and headers["x-tradeguard-alert-id"] == alert.alert_id
        )
        assert headers["x-tradeguard-signature"] == notify.sign(
            secret, int(headers["x-tradeguard-timestamp"]), body
        )
        datagram = receiver.recv(65536).decode()
        assert datagram.startswith("<114>1 ") and alert.alert_id in datagram
        _Hook.status = 500  # a receiver that fails: the action FAILED, saying where
        status, detail = await actions.act(
            alert, ActionRecord(ActionKind.NOTIFY, "api_key:tgk_x", ActionStatus.PENDING)
        )
        assert status is ActionStatus.FAILED and detail.startswith("webhook:")
    finally:
        _Hook.status = 204
        server.shutdown()
        server.server_close()
        receiver.close()


async def test_the_kill_switch_action_engages_the_scope(trading: RunningTrading, tmp_path: Path) -> None:
    """Against the real trading service: the monitor's signed EngageKillSwitch at the key's scope cancels its open
    orders and refuses new ones. (Made as workload `ops`: the trading service's policy does not list `monitor` for
    EngageKillSwitch yet; the monitor's own channel is the same call as workload `monitor`.)"""
    async with trading.channel() as channel:
        placed = await trading.stub(channel).PlaceOrder(order("mon-kill-1"), timeout=10)
    officer = await create_auth_user(trading.auth, "acct-ops", roles=("risk-officer",))
    key = await create_api_key(trading.auth, officer.user_id, "trading:halt")
    signed = authenticated_channel(
        trading.target, "trading", tls.Workload.of(trading.paths, "ops"), signing_interceptors(key)
    )
    async with signed:
        actions = actions_for(trading.paths, trading=signed)
        alert = sample_alert(ActionKind.KILL_SWITCH, trading.key.key_id)
        status, detail = await actions.act(
            alert, ActionRecord(ActionKind.KILL_SWITCH, f"api_key:{trading.key.key_id}", ActionStatus.PENDING)
        )
        assert (status, detail) == (ActionStatus.DONE, "cancelled 1 open orders")
        again = await actions.act(
            alert, ActionRecord(ActionKind.KILL_SWITCH, f"api_key:{trading.key.key_id}", ActionStatus.PENDING)
        )
        assert again == (ActionStatus.DONE, "cancelled 0 open orders")  # engaging again finds the switch
    async with trading.channel() as channel:
        stub = trading.stub(channel)
        got = await stub.GetOrder(trading_pb2.GetOrderRequest(order_id=placed.order.order_id), timeout=10)
        assert got.order.status == trading_pb2.ORDER_STATUS_CANCELED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PlaceOrder(order("mon-kill-2"), timeout=10)
        assert rich_status(refused.value).reason == "KILL_SWITCH_ENGAGED"


async def test_without_credentials_the_kill_switch_is_skipped(pki_paths: pki.PkiPaths) -> None:
    actions = actions_for(pki_paths)
    status, detail = await actions.act(
        sample_alert(ActionKind.KILL_SWITCH, "tgk_x"),
        ActionRecord(ActionKind.KILL_SWITCH, "api_key:tgk_x", ActionStatus.PENDING),
    )
    assert status is ActionStatus.SKIPPED and "KILL_SWITCH_CREDENTIALS_FILE" in detail


def order(coid: str) -> trading_pb2.PlaceOrderRequest:
    return trading_pb2.PlaceOrderRequest(
        account_id="acct-1", client_order_id=coid, symbol="BTC-USD", side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT, quantity="1", price="100",
    )  # fmt: skip


async def test_a_revocation_the_auth_service_cannot_take_fails_saying_why(pki_paths: pki.PkiPaths) -> None:
    actions = actions_for(pki_paths)  # its auth channel leads nowhere: UNAVAILABLE, tried three times
    status, detail = await actions.act(
        sample_alert(ActionKind.REVOKE_KEY, "tgk_x"),
        ActionRecord(ActionKind.REVOKE_KEY, "tgk_x", ActionStatus.PENDING),
    )
    assert status is ActionStatus.FAILED and "UNAVAILABLE" in detail
