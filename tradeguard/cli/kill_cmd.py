"""`tradeguard kill …`: the trading kill switch. Prints the service's answer as JSON.

- `engage --scope global|account|api-key|symbol [--value V] --reason TEXT`: refuse new orders in the scope and
  cancel every open order in it at once (every trading instance refuses within a second). Needs the
  `trading:halt` permission (the `risk-officer` role).
- `release --scope … [--value V] --reason TEXT`: let orders in again. Needs `trading:halt` AND a login with a
  second factor at most 5 minutes ago: `tradeguard auth login USERNAME` (with your one-time code) first, then
  `--login USERNAME`; an API key or a refreshed token is refused (FRESH_MFA_REQUIRED).
- `status [--all]`: the engaged switches (`--all`: released ones too, most recent first).

The credentials are those of `tradeguard orders` (`--key-id` with its secret, or `--login`); the calls go over the
mesh as the workload `--as` names (`ops` by default).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from tradeguard.cli import common, orders_cmd
from tradeguard.cli.mesh_call import call_service, to_json
from tradeguard.rpc.status import RichStatus
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

SCOPES = {
    "global": trading_pb2.KILL_SWITCH_SCOPE_GLOBAL,
    "account": trading_pb2.KILL_SWITCH_SCOPE_ACCOUNT,
    "api-key": trading_pb2.KILL_SWITCH_SCOPE_API_KEY,
    "symbol": trading_pb2.KILL_SWITCH_SCOPE_SYMBOL,
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    action = common.service_command(
        subparsers,
        "kill",
        "engage, release and show the trading kill switch",
        __doc__,
        service="trading",
        run=lambda args: asyncio.run(_run(args)),
        options=orders_cmd.add_credential_options,
    )
    for name, text in (
        ("engage", "halt a scope: refuse its new orders and cancel its open ones"),
        ("release", "let a halted scope trade again (needs a fresh login with a second factor)"),
    ):
        parser = action(name, text)
        parser.add_argument("--scope", choices=list(SCOPES), required=True, help="what to halt")
        parser.add_argument(
            "--value", default="", help="the account id, API key id or symbol (none for --scope global)"
        )
        parser.add_argument("--reason", required=True, help="why (recorded with the switch)")
    status = action("status", "show the engaged switches")
    status.add_argument("--all", action="store_true", help="released switches too (history)")


def _hint(args: argparse.Namespace, status: RichStatus) -> str | None:
    if status.reason == "FRESH_MFA_REQUIRED":
        return (
            "log in again with your one-time code (`tradeguard auth login USERNAME`) and release with "
            "`--login USERNAME` within 5 minutes"
        )
    if status.code == grpc.StatusCode.PERMISSION_DENIED:
        return "the kill switch needs the trading:halt permission (the risk-officer role)"
    return None


async def _call(stub: trading_pb2_grpc.TradingServiceAsyncStub, args: argparse.Namespace) -> Any:
    if args.action == "engage":
        return await stub.EngageKillSwitch(
            trading_pb2.EngageKillSwitchRequest(
                scope=SCOPES[args.scope], value=args.value, reason=args.reason
            ),
            timeout=30,
        )
    if args.action == "release":
        return await stub.ReleaseKillSwitch(
            trading_pb2.ReleaseKillSwitchRequest(
                scope=SCOPES[args.scope], value=args.value, reason=args.reason
            ),
            timeout=30,
        )
    return await stub.ListKillSwitches(
        trading_pb2.ListKillSwitchesRequest(include_released=args.all), timeout=30
    )


async def _run(args: argparse.Namespace) -> int:
    reply = await call_service(
        args,
        "trading",
        lambda channel: _call(trading_pb2_grpc.TradingServiceStub(channel), args),
        authentication=lambda: orders_cmd.authentication(args),
        hint=lambda status: _hint(args, status),
    )
    if reply is None:
        return 1
    print(to_json(reply))
    return 0
