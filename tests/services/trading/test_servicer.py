"""The trading service end to end over mutual TLS: proto in, rich errors out."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from tradeguard.rpc.status import rich_status
from tradeguard.trading.v1 import trading_pb2

if TYPE_CHECKING:
    from tests.services.trading.conftest import GuardedTrading as RunningTrading


def order(coid: str = "c-1", /, **over: object) -> trading_pb2.PlaceOrderRequest:
    fields: dict[str, object] = dict(
        account_id="acct-1",
        client_order_id=coid,
        symbol="BTC-USD",
        side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT,
        quantity="0.500",
        price="100.25",
    )
    fields.update(over)
    return trading_pb2.PlaceOrderRequest(**fields)  # type: ignore[arg-type]


async def test_place_get_cancel_list(trading: RunningTrading) -> None:
    async with await trading.channel() as channel:
        stub = trading.stub(channel)
        placed = await stub.PlaceOrder(order(), timeout=5)
        assert not placed.replayed
        o = placed.order
        assert o.order_id.startswith("ord_") and o.quantity == "0.5" and o.price == "100.25"
        assert o.time_in_force == trading_pb2.TIME_IN_FORCE_GTC
        assert o.create_time.seconds > 0 and o.create_time.nanos % 1000 == 0  # microsecond precision
        got = await stub.GetOrder(
            trading_pb2.GetOrderRequest(account_id="acct-1", order_id=o.order_id), timeout=5
        )
        assert got.order == o
        canceled = await stub.CancelOrder(
            trading_pb2.CancelOrderRequest(account_id="acct-1", order_id=o.order_id), timeout=5
        )
        assert canceled.order.status == trading_pb2.ORDER_STATUS_CANCELED
        listed = await stub.ListOrders(trading_pb2.ListOrdersRequest(account_id="acct-1"), timeout=5)
        assert [x.order_id for x in listed.orders] == [o.order_id]


async def test_place_is_idempotent_by_client_order_id(trading: RunningTrading) -> None:
    async with await trading.channel() as channel:
        stub = trading.stub(channel)
        replies = await asyncio.gather(*(stub.PlaceOrder(order("same"), timeout=5) for _ in range(20)))
        assert len({r.order.order_id for r in replies}) == 1
        assert sum(not r.replayed for r in replies) == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PlaceOrder(order("same", quantity="2"), timeout=5)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert rich_status(err.value).reason == "CLIENT_ORDER_ID_REUSED"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"symbol": "btc usd"}, "symbol"),
        ({"side": 0}, "side"),
        ({"type": 7}, "type"),
        ({"quantity": "-1"}, "quantity"),
        ({"quantity": "1e3"}, "quantity"),
        ({"price": "1.123456789"}, "price"),
        ({"client_order_id": ""}, "client_order_id"),
    ],
)
async def test_invalid_input_is_invalid_argument_naming_the_field(
    trading: RunningTrading, override: dict[str, object], field: str
) -> None:
    async with await trading.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(channel).PlaceOrder(order(**override), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rich_status(err.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details_problem is None
    assert status.error_info is not None and status.error_info.domain == "tradeguard.dev"
    assert field in [v.field for v in status.field_violations]


async def test_unknown_order_is_not_found(trading: RunningTrading) -> None:
    async with await trading.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(channel).GetOrder(
                trading_pb2.GetOrderRequest(account_id="acct-1", order_id="ord_01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- every order belongs to the caller's account ------------------------------------------------------------


async def test_another_accounts_orders_are_permission_denied_before_anything_is_looked_up(
    trading: RunningTrading,
) -> None:
    async with await trading.channel("acct-1") as mine, await trading.channel("acct-2") as theirs:
        placed = (await trading.stub(mine).PlaceOrder(order(), timeout=5)).order
        other = trading.stub(theirs)
        for call in (
            other.PlaceOrder(order("c-9", account_id="acct-1"), timeout=5),
            other.GetOrder(
                trading_pb2.GetOrderRequest(account_id="acct-1", order_id=placed.order_id), timeout=5
            ),
            # an order that does not exist: the same answer (permission before existence)
            other.GetOrder(
                trading_pb2.GetOrderRequest(account_id="acct-1", order_id="ord_01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                timeout=5,
            ),
            other.CancelOrder(
                trading_pb2.CancelOrderRequest(account_id="acct-1", order_id=placed.order_id), timeout=5
            ),
            other.ListOrders(trading_pb2.ListOrdersRequest(account_id="acct-1"), timeout=5),
            other.PlaceOrder(order("c-9", account_id="a b"), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert rich_status(err.value).reason == "ACCOUNT_NOT_ALLOWED"
        # the order's own id under the caller's account: not theirs, so not found
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await other.GetOrder(trading_pb2.GetOrderRequest(order_id=placed.order_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await other.ListOrders(trading_pb2.ListOrdersRequest(), timeout=5)).orders == []
        # an empty account_id means the caller's own
        mine_listed = await trading.stub(mine).ListOrders(trading_pb2.ListOrdersRequest(), timeout=5)
        assert [o.order_id for o in mine_listed.orders] == [placed.order_id]
        assert (
            await trading.stub(mine).PlaceOrder(order("c-2", account_id=""), timeout=5)
        ).order.account_id == "acct-1"


async def test_each_method_needs_its_permission(trading: RunningTrading) -> None:
    async with await trading.channel(scope="orders:read") as reader, trading.unauthenticated() as nobody:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(reader).PlaceOrder(order(), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(reader).CancelOrder(
                trading_pb2.CancelOrderRequest(order_id="ord_01ARZ3NDEKTSV4RRFFQ69G5FAV"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (
            await trading.stub(reader).ListOrders(trading_pb2.ListOrdersRequest(), timeout=5)
        ).orders == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(nobody).ListOrders(trading_pb2.ListOrdersRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
