"""`tradeguard orders …`: place, get, cancel and list orders on the trading service (as `ops` unless --as says
otherwise). Prints the service's answer as JSON, every field included."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from tradeguard.cli import common
from tradeguard.cli.mesh_call import call_service, to_json
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

SIDES = {"buy": trading_pb2.SIDE_BUY, "sell": trading_pb2.SIDE_SELL}
TYPES = {"limit": trading_pb2.ORDER_TYPE_LIMIT, "market": trading_pb2.ORDER_TYPE_MARKET}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    orders = subparsers.add_parser(
        "orders",
        help="place, get, cancel and list orders on the trading service",
        description=__doc__,
        formatter_class=common.HelpFormatter,
    )
    common.add_identity_options(orders, "trading", top=True)
    common.add_home_option(orders)
    sub = orders.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=common.HelpFormatter
        )
        common.add_identity_options(parser, "trading")
        common.add_home_option(parser)
        parser.add_argument("--account", required=True, help="the account the order belongs to")
        return parser

    place = action("place", "place an order (idempotent by --account and --client-order-id); prints it")
    place.add_argument(
        "--client-order-id",
        required=True,
        help="your id for the order: resending it replays the first answer",
    )
    place.add_argument("--symbol", required=True, help="instrument, e.g. BTC-USD")
    place.add_argument("--side", choices=sorted(SIDES), required=True, help="buy or sell")
    place.add_argument("--type", choices=sorted(TYPES), default="limit", help="order type")
    place.add_argument("--quantity", required=True, help="a positive decimal string, e.g. 0.5")
    place.add_argument(
        "--price", default="", help="limit price as a decimal string (none for a market order)"
    )
    for name, text in (("get", "show one order"), ("cancel", "cancel an open order")):
        one = action(name, text)
        one.add_argument("--order-id", required=True, help="the order's id, as `place` printed it")
    listing = action("list", "list an account's orders, newest first")
    listing.add_argument(
        "--page-size", type=int, default=0, help="orders per page (0: the service's default)"
    )
    listing.add_argument("--page-token", default="", help="next_page_token of the previous page")
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
        args, "trading", lambda channel: _call(trading_pb2_grpc.TradingServiceStub(channel), args)
    )
    if reply is None:
        return 1
    print(to_json(reply))
    return 0
