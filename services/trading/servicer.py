"""TradingService over gRPC: proto ↔ core, nothing else. Errors are raised as DomainErrors.

Every call acts for the principal the guard verified (`current_principal()`): its account, whatever account the
request names (another one is PERMISSION_DENIED, checked before anything is looked up; empty means its own)."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from services.trading.core import TradingCore, account_of, parse_new_order
from services.trading.model import Order, format_decimal
from tradeguard.principal import current_principal
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

Context = Any  # grpc.aio.ServicerContext; the servicer never touches it


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, us = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=us * 1000)


def order_to_proto(order: Order) -> trading_pb2.Order:
    return trading_pb2.Order(
        order_id=order.order_id,
        account_id=order.account_id,
        client_order_id=order.client_order_id,
        symbol=order.symbol,
        side=int(order.side),  # type: ignore[arg-type]
        type=int(order.type),  # type: ignore[arg-type]
        time_in_force=int(order.time_in_force),  # type: ignore[arg-type]
        quantity=format_decimal(order.quantity),
        price="" if order.price is None else format_decimal(order.price),
        status=int(order.status),  # type: ignore[arg-type]
        create_time=_timestamp(order.create_time_us),
        update_time=_timestamp(order.update_time_us),
    )


class TradingServicer(trading_pb2_grpc.TradingServiceServicer):
    def __init__(self, core: TradingCore) -> None:
        self._core = core

    async def PlaceOrder(
        self, request: trading_pb2.PlaceOrderRequest, context: Context
    ) -> trading_pb2.PlaceOrderResponse:
        new = parse_new_order(
            account_id=account_of(current_principal(), request.account_id),
            client_order_id=request.client_order_id,
            symbol=request.symbol,
            side=request.side,
            type=request.type,
            time_in_force=request.time_in_force,
            quantity=request.quantity,
            price=request.price,
            limits=self._core.limits,
        )
        order, replayed = await self._core.place(new)
        return trading_pb2.PlaceOrderResponse(order=order_to_proto(order), replayed=replayed)

    async def CancelOrder(
        self, request: trading_pb2.CancelOrderRequest, context: Context
    ) -> trading_pb2.CancelOrderResponse:
        account = account_of(current_principal(), request.account_id)
        order = await self._core.cancel(account, request.order_id)
        return trading_pb2.CancelOrderResponse(order=order_to_proto(order))

    async def GetOrder(
        self, request: trading_pb2.GetOrderRequest, context: Context
    ) -> trading_pb2.GetOrderResponse:
        account = account_of(current_principal(), request.account_id)
        order = await self._core.get(account, request.order_id)
        return trading_pb2.GetOrderResponse(order=order_to_proto(order))

    async def ListOrders(
        self, request: trading_pb2.ListOrdersRequest, context: Context
    ) -> trading_pb2.ListOrdersResponse:
        account = account_of(current_principal(), request.account_id)
        orders, token = await self._core.list(account, request.page_size, request.page_token)
        return trading_pb2.ListOrdersResponse(
            orders=[order_to_proto(o) for o in orders], next_page_token=token
        )
