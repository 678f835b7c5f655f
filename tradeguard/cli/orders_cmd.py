"""`tradeguard orders …`: place, get, cancel and list orders on the trading service as the ops identity."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from google.protobuf import json_format

from tradeguard.cli.mesh_call import call_service
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

SIDES = {"buy": trading_pb2.SIDE_BUY, "sell": trading_pb2.SIDE_SELL}
TYPES = {"limit": trading_pb2.ORDER_TYPE_LIMIT, "market": trading_pb2.ORDER_TYPE_MARKET}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    orders = subparsers.add_parser("orders", help="call the trading service")
    orders.add_argument(
        "--target", default=None, help="host:port (default 127.0.0.1:$TRADEGUARD_TRADING_PORT)"
    )
    orders.add_argument("--as", dest="identity", default="ops", help="workload certificate to use")
    sub = orders.add_subparsers(dest="action", required=True)
    place = sub.add_parser("place")
    place.add_argument("--account", required=True)
    place.add_argument("--client-order-id", required=True)
    place.add_argument("--symbol", required=True)
    place.add_argument("--side", choices=sorted(SIDES), required=True)
    place.add_argument("--type", choices=sorted(TYPES), default="limit")
    place.add_argument("--quantity", required=True)
    place.add_argument("--price", default="")
    for name in ("get", "cancel"):
        one = sub.add_parser(name)
        one.add_argument("--account", required=True)
        one.add_argument("--order-id", required=True)
    listing = sub.add_parser("list")
    listing.add_argument("--account", required=True)
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    orders.set_defaults(func=lambda args: asyncio.run(_run(args)))


async def _call(stub: trading_pb2_grpc.TradingServiceAsyncStub, args: argparse.Namespace) -> Any:
    if args.action == "place":
        return await stub.PlaceOrder(
            trading_pb2.PlaceOrderRequest(
                account_id=args.account,
                client_order_id=args.client_order_id,
                symbol=args.symbol,
                side=SIDES[args.side],
                type=TYPES[args.type],
                quantity=args.quantity,
                price=args.price,
            ),
            timeout=10,
        )
    if args.action == "get":
        return await stub.GetOrder(
            trading_pb2.GetOrderRequest(account_id=args.account, order_id=args.order_id)
        )
    if args.action == "cancel":
        return await stub.CancelOrder(
            trading_pb2.CancelOrderRequest(account_id=args.account, order_id=args.order_id)
        )
    return await stub.ListOrders(
        trading_pb2.ListOrdersRequest(
            account_id=args.account, page_size=args.page_size, page_token=args.page_token
        )
    )


async def _run(args: argparse.Namespace) -> int:
    reply = await call_service(
        args, "trading", 50055, lambda channel: _call(trading_pb2_grpc.TradingServiceStub(channel), args)
    )
    if reply is None:
        return 1
    print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    return 0
