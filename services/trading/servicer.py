"""TradingService over gRPC: proto ↔ core, nothing else. Errors are raised as DomainErrors.

Every call acts for the principal the guard verified (`current_principal()`): its account, whatever account the
request names (another one is PERMISSION_DENIED, checked before anything is looked up; empty means its own)."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from services.trading.controls import TradingControls
from services.trading.core import TradingCore, account_of, parse_decimal, parse_new_order
from services.trading.errors import InvalidArgument
from services.trading.limits import DECIMAL_FIELDS, INT_FIELDS, limits_to_fields
from services.trading.model import KillSwitch, Order, format_decimal
from tradeguard.errors import FailedPrecondition, Unauthenticated
from tradeguard.principal import Principal, current_principal
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


def switch_to_proto(switch: KillSwitch) -> trading_pb2.KillSwitch:
    message = trading_pb2.KillSwitch(
        kill_switch_id=switch.switch_id,
        scope=int(switch.scope),  # type: ignore[arg-type]
        value=switch.value,
        reason=switch.reason,
        engaged_by=switch.engaged_by,
        engage_time=_timestamp(switch.engaged_at_us),
        released_by=switch.released_by,
        release_reason=switch.release_reason,
    )
    if switch.released_at_us is not None:
        message.release_time.CopyFrom(_timestamp(switch.released_at_us))
    return message


def limits_to_proto(fields: dict[str, Any]) -> trading_pb2.RiskLimits:
    return trading_pb2.RiskLimits(**fields)


def limits_from_proto(limits: trading_pb2.RiskLimits) -> dict[str, Any]:
    """The fields set in `limits` (validated by services/trading/limits.py)."""
    fields: dict[str, Any] = {}
    for name in (*DECIMAL_FIELDS, *INT_FIELDS):
        if limits.HasField(name):
            fields[name] = getattr(limits, name)
    if limits.restricted_symbols:
        fields["restricted_symbols"] = list(limits.restricted_symbols)
    return fields


def _caller() -> Principal:
    principal = current_principal()
    if principal is None:
        raise Unauthenticated("no principal: the service is not behind the guard")
    return principal


class TradingServicer(trading_pb2_grpc.TradingServiceServicer):
    def __init__(self, core: TradingCore) -> None:
        self._core = core

    def _controls(self) -> TradingControls:
        controls = self._core.controls
        if controls is None:
            raise FailedPrecondition(
                "this trading service runs without pre-trade controls", reason="NO_CONTROLS"
            )
        return controls

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
        principal = current_principal()
        api_key_id = "" if principal is None or principal.key_id is None else principal.key_id
        order, replayed = await self._core.place(new, api_key_id)
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

    async def EngageKillSwitch(
        self, request: trading_pb2.EngageKillSwitchRequest, context: Context
    ) -> trading_pb2.EngageKillSwitchResponse:
        principal = _caller()
        switch, cancelled = await self._controls().engage(
            request.scope, request.value, request.reason, principal.user_id
        )
        return trading_pb2.EngageKillSwitchResponse(
            kill_switch=switch_to_proto(switch), cancelled_orders=cancelled
        )

    async def ReleaseKillSwitch(
        self, request: trading_pb2.ReleaseKillSwitchRequest, context: Context
    ) -> trading_pb2.ReleaseKillSwitchResponse:
        switch = await self._controls().release(request.scope, request.value, request.reason, _caller())
        return trading_pb2.ReleaseKillSwitchResponse(kill_switch=switch_to_proto(switch))

    async def ListKillSwitches(
        self, request: trading_pb2.ListKillSwitchesRequest, context: Context
    ) -> trading_pb2.ListKillSwitchesResponse:
        switches = await self._controls().switches_listed(request.include_released)
        return trading_pb2.ListKillSwitchesResponse(kill_switches=[switch_to_proto(s) for s in switches])

    async def SetReferencePrice(
        self, request: trading_pb2.SetReferencePriceRequest, context: Context
    ) -> trading_pb2.SetReferencePriceResponse:
        try:
            price = parse_decimal(request.price)
        except ValueError as error:
            raise InvalidArgument.field("price", str(error)) from None
        await self._controls().set_price(request.symbol, price)
        return trading_pb2.SetReferencePriceResponse(symbol=request.symbol, price=format_decimal(price))

    async def GetRiskLimits(
        self, request: trading_pb2.GetRiskLimitsRequest, context: Context
    ) -> trading_pb2.GetRiskLimitsResponse:
        limits, source, override = self._controls().effective_limits(request.account_id)
        response = trading_pb2.GetRiskLimitsResponse(
            limits=limits_to_proto(limits_to_fields(limits)), source=source
        )
        if override is not None:
            response.override.CopyFrom(limits_to_proto(override))
        return response

    async def SetRiskLimits(
        self, request: trading_pb2.SetRiskLimitsRequest, context: Context
    ) -> trading_pb2.SetRiskLimitsResponse:
        controls = self._controls()
        fields = limits_from_proto(request.limits)
        if request.clear and fields:
            raise InvalidArgument.field("limits", "must be empty when clear is set")
        await controls.set_limits(request.account_id, None if request.clear else fields, _caller().user_id)
        limits, source, _ = controls.effective_limits(request.account_id)
        return trading_pb2.SetRiskLimitsResponse(
            limits=limits_to_proto(limits_to_fields(limits)), source=source
        )
