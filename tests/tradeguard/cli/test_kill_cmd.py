"""`tradeguard kill engage|release|status` as a process, exactly as an operator runs it, against the real trading
service behind its guard (the session's real auth service verifying a risk officer's API key)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.conftest import RunningTrading
from tests.support import create_api_key, create_auth_user
from tradeguard.cli import main
from tradeguard.rpc.status import rich_status
from tradeguard.trading.v1 import trading_pb2

ROOT = Path(__file__).resolve().parents[3]


async def cli(trading: RunningTrading, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TRADEGUARD_HOME=str(trading.paths.home),
        TRADEGUARD_TRADING_PORT=str(trading.port),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tradeguard.cli.main",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def officer_key(trading: RunningTrading, tmp_path: Path) -> tuple[str, ...]:
    """The options naming a risk officer's API key (trading:halt), its secret in a file of its own."""
    user = await create_auth_user(trading.auth, "acct-ops", roles=("risk-officer",))
    key = await create_api_key(trading.auth, user.user_id, "trading:halt")
    assert key.secret is not None
    secret = tmp_path / "officer.secret"
    secret.write_text(key.secret + "\n")
    secret.chmod(0o600)
    return ("--key-id", key.key_id, "--secret-file", str(secret))


def test_the_options_parse_before_or_after_the_action() -> None:
    args = main.parser().parse_args(
        ["kill", "--key-id", "K", "engage", "--scope", "symbol", "--value", "X", "--reason", "r"]
    )
    assert (args.action, args.key_id, args.scope, args.value, args.reason) == (
        "engage",
        "K",
        "symbol",
        "X",
        "r",
    )
    args = main.parser().parse_args(["kill", "status", "--all", "--login", "alice"])
    assert (args.action, args.all, args.login) == ("status", True, "alice")
    with pytest.raises(SystemExit):
        main.parser().parse_args(["kill", "engage", "--scope", "planet", "--reason", "r"])


async def test_engage_status_and_a_release_without_a_fresh_second_factor(
    trading: RunningTrading, tmp_path: Path
) -> None:
    async with trading.channel() as channel:
        placed = await trading.stub(channel).PlaceOrder(
            trading_pb2.PlaceOrderRequest(
                client_order_id="cli-1",
                symbol="BTC-USD",
                side=trading_pb2.SIDE_BUY,
                type=trading_pb2.ORDER_TYPE_LIMIT,
                quantity="1",
                price="100",
            ),
            timeout=10,
        )
    key = await officer_key(trading, tmp_path)
    engaged = await cli(
        trading, "kill", *key, "engage", "--scope", "account", "--value", "acct-1", "--reason", "drill"
    )
    assert engaged.returncode == 0, engaged.stderr
    reply = json.loads(engaged.stdout)
    assert int(reply["cancelled_orders"]) == 1
    assert (
        reply["kill_switch"]["scope"] == "KILL_SWITCH_SCOPE_ACCOUNT"
        and reply["kill_switch"]["value"] == "acct-1"
    )
    async with trading.channel() as channel:
        stub = trading.stub(channel)
        got = await stub.GetOrder(trading_pb2.GetOrderRequest(order_id=placed.order.order_id), timeout=10)
        assert got.order.status == trading_pb2.ORDER_STATUS_CANCELED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PlaceOrder(
                trading_pb2.PlaceOrderRequest(
                    client_order_id="cli-2",
                    symbol="BTC-USD",
                    side=trading_pb2.SIDE_BUY,
                    type=trading_pb2.ORDER_TYPE_LIMIT,
                    quantity="1",
                    price="100",
                ),
                timeout=10,
            )
        assert rich_status(refused.value).reason == "KILL_SWITCH_ENGAGED"

    status = await cli(trading, "kill", "status", *key)
    assert status.returncode == 0, status.stderr
    assert [s["value"] for s in json.loads(status.stdout)["kill_switches"]] == ["acct-1"]

    # an API key never carries a second factor: release is refused, and the command says what to do
    release = await cli(
        trading, "kill", *key, "release", "--scope", "account", "--value", "acct-1", "--reason", "ok"
    )
    assert release.returncode == 1 and release.stdout == ""
    assert "FRESH_MFA_REQUIRED" in release.stderr and "tradeguard auth login" in release.stderr

    # a trader's key holds no trading:halt
    trader_secret = tmp_path / "trader.secret"
    assert trading.key.secret is not None
    trader_secret.write_text(trading.key.secret + "\n")
    trader_secret.chmod(0o600)
    denied = await cli(
        trading,
        *("kill", "--key-id", trading.key.key_id, "--secret-file", str(trader_secret)),
        *("engage", "--scope", "global", "--reason", "nope"),
    )
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
