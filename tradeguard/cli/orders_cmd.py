"""`tradeguard orders …`: place, get, cancel and list orders on the trading service. Prints the service's answer
as JSON, every field included.

Every order call carries a person's credentials, checked by the trading service's guard:
- an API key: `--key-id K` signs each call (TG1-HMAC-SHA256) with the secret in `--secret-file F` (default
  $TRADEGUARD_HOME/credentials/K.secret, where `tradeguard auth key create … --save` writes it), or (TG1-ED25519)
  with the private key in `--ed25519-key-file F`;
- a login: `--login USERNAME` sends the access token `tradeguard auth login USERNAME` stored, refreshed first when
  it expires. The token is bound to the workload certificate that logged in (`--as`, `ops` by default).
The calls go over the mesh as the workload `--as` names (`ops` by default); the order belongs to the credentials'
account (`--account` may name it, and another account is refused).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc

from tradeguard.cli import auth_cmd, common, credentials
from tradeguard.cli.common import CliError
from tradeguard.cli.mesh_call import call_service, to_json
from tradeguard.guard.client import ApiKeyCredentials, bearer_interceptors, signing_interceptors
from tradeguard.rpc.status import RichStatus
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
    add_credential_options(orders, top=True)
    common.add_home_option(orders)
    sub = orders.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=common.HelpFormatter
        )
        common.add_identity_options(parser, "trading")
        add_credential_options(parser)
        common.add_home_option(parser)
        parser.add_argument(
            "--account",
            default="",
            help="the account the order belongs to (default: the account of the API key's or login's user; "
            "another account is refused)",
        )
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


def add_credential_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The credential options on `orders` (`top`) and, repeated, on each action, so they may be written before
    or after it."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--key-id",
        metavar="KEY_ID",
        default=default,
        help="sign each call with this API key (tgk_…), with --secret-file or --ed25519-key-file",
    )
    parser.add_argument(
        "--secret-file",
        metavar="FILE",
        default=default,
        help="the HMAC key's secret: default $TRADEGUARD_HOME/credentials/KEY_ID.secret (`auth key create --save`)",
    )
    parser.add_argument(
        "--ed25519-key-file",
        metavar="FILE",
        default=default,
        help="sign with this Ed25519 private key (PEM, `openssl genpkey -algorithm ed25519`) instead",
    )
    parser.add_argument(
        "--login",
        metavar="USERNAME",
        default=default,
        help="send the access token `tradeguard auth login USERNAME` stored (refreshed when it expires)",
    )


NO_CREDENTIALS = (
    "orders need a person's credentials: an API key (`tradeguard auth key create USER_ID --scope orders:read "
    "--scope orders:write --save`, then `--key-id KEY_ID`) or a login (`tradeguard auth login USERNAME`, then "
    "`--login USERNAME`); see `tradeguard orders --help`"
)


def api_key(args: argparse.Namespace) -> ApiKeyCredentials | None:
    """The API key the options name (its secret or private key read from its file), None without --key-id;
    CliError for a contradictory or unreadable choice."""
    key_id, secret_file, ed25519_file = args.key_id, args.secret_file, args.ed25519_key_file
    if key_id is None:
        if secret_file or ed25519_file:
            raise CliError("--secret-file and --ed25519-key-file sign for an API key: add --key-id KEY_ID")
        return None
    if args.login:
        raise CliError("--key-id and --login are two credentials: give one")
    if secret_file and ed25519_file:
        raise CliError(
            "an API key signs with its HMAC secret or its Ed25519 private key: give one of the files"
        )
    if ed25519_file:
        seed = credentials.read_ed25519_private_key(ed25519_file)
        return _credentials(key_id, ed25519_seed=seed)
    path = secret_file or str(credentials.secret_path(args.home, key_id))
    if not secret_file and not Path(path).exists():
        raise CliError(
            f"no secret for {key_id} in {path}: give --secret-file FILE (or --ed25519-key-file for an Ed25519 "
            "key), or create a key with `tradeguard auth key create USER_ID … --save`"
        )
    return _credentials(key_id, secret=credentials.read_secret_file(path))


def _credentials(key_id: str, **material: Any) -> ApiKeyCredentials:
    try:
        return ApiKeyCredentials(key_id, **material)
    except ValueError as error:
        raise CliError(f"--key-id {key_id!r}: {error}") from None


async def authentication(args: argparse.Namespace) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that authenticate each call: signing with the API key, or the login's bearer token
    (refreshed first when it expires). CliError saying what to run when no credential is given."""
    key = api_key(args)
    if key is not None:
        return signing_interceptors(key)
    if args.login:
        session = await auth_cmd.fresh_session(args.home, args.login, args.identity)
        return bearer_interceptors(session.access_token)
    raise CliError(NO_CREDENTIALS)


def _hint(args: argparse.Namespace, status: RichStatus) -> str | None:
    if status.code == grpc.StatusCode.UNAUTHENTICATED:
        if args.login:
            return (
                f"the login of {args.login} was refused (revoked, or its roles changed): run "
                f"`tradeguard auth login {args.login}`"
            )
        return (
            "the API key was refused: check --key-id and its secret or private key, that the key is active "
            "(`tradeguard auth key list USER_ID`), that this address is in its IP allow-list, and this clock"
        )
    if status.code == grpc.StatusCode.PERMISSION_DENIED and args.account:
        return "is --account the credentials' own account, and does the key or role allow this call?"
    return None


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
        args,
        "trading",
        lambda channel: _call(trading_pb2_grpc.TradingServiceStub(channel), args),
        authentication=lambda: authentication(args),
        hint=lambda status: _hint(args, status),
    )
    if reply is None:
        return 1
    print(to_json(reply))
    return 0
