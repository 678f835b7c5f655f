"""The trading service end to end over mutual TLS: proto in, rich errors out."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from tradeguard.rpc.status import rich_status
from tradeguard.trading.v1 import trading_pb2

if TYPE_CHECKING:
    from tests.conftest import RunningTrading


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
    async with trading.channel() as channel:
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
    async with trading.channel() as channel:
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
        ({"account_id": "a b"}, "account_id"),
    ],
)
async def test_invalid_input_is_invalid_argument_naming_the_field(
    trading: RunningTrading, override: dict[str, object], field: str
) -> None:
    async with trading.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(channel).PlaceOrder(order(**override), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rich_status(err.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details_problem is None
    assert status.error_info is not None and status.error_info.domain == "tradeguard.dev"
    assert field in [v.field for v in status.field_violations]


async def test_unknown_order_is_not_found(trading: RunningTrading) -> None:
    async with trading.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(channel).GetOrder(
                trading_pb2.GetOrderRequest(account_id="acct-1", order_id="ord_01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
