"""The trading core: order validation, idempotent placement, cancellation and paging.

With `controls` (services/trading/controls.py), placing an order is, in this order: the idempotency lookup (a
retry of a placed order returns it: never re-checked, never a duplicate, never throttled twice) → the kill
switch (in memory) → the risk checks (`RiskEngine.check`, credit left to the store) → the store's insert
transaction, which under its lock re-checks the kill switch and runs the credit check on the account's open
notional (`Admission`). If anything fails after the risk checks passed, the engine forgets the order
(`discard`), so a corrected order is not taken for its duplicate.

Pure: no grpc, no protobuf, no I/O of its own. Time and order ids are injected; storage is an `OrderStore`.
Quantities and prices are `Decimal`, parsed only from plain decimal strings and kept in canonical form.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Callable
from decimal import Context, Decimal
from typing import TYPE_CHECKING, Any

from services.trading.errors import (
    FieldViolation,
    InvalidArgument,
    account_not_allowed,
    client_order_id_reused,
    order_not_found,
    order_not_open,
)
from services.trading.model import (
    Admission,
    KillScope,
    NewOrder,
    Order,
    OrderLimits,
    OrderStatus,
    OrderType,
    PageCursor,
    Side,
    TimeInForce,
    format_decimal,
)
from tradeguard.errors import Unauthenticated
from tradeguard.risk.model import OrderType as RiskOrderType
from tradeguard.risk.model import RiskOrder
from tradeguard.risk.model import Side as RiskSide

if TYPE_CHECKING:
    from services.trading.controls import TradingControls
    from services.trading.store import OrderStore
    from tradeguard.principal import Principal


# --- whose orders -----------------------------------------------------------------------------------------


def account_of(principal: Principal | None, requested: str) -> str:
    """The account a call acts for: always the calling principal's own (every order belongs to it). An empty
    `account_id` in the request means the principal's account; any other account is PERMISSION_DENIED before
    anything is looked up (permission before existence). No principal (the service is not behind the guard):
    UNAUTHENTICATED — the core never acts for nobody."""
    if principal is None:
        raise Unauthenticated("no principal: the service is not behind the guard")
    if requested and requested != principal.account_id:
        raise account_not_allowed()
    return principal.account_id


# --- validation -----------------------------------------------------------------------------------------

_ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CLIENT_ORDER_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SYMBOL = re.compile(r"[A-Z0-9]{1,12}(?:[-/][A-Z0-9]{1,12})?")
_PLAIN_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_NEGATIVE_DECIMAL = re.compile(r"-[0-9]+(?:\.[0-9]+)?")  # a number, just not a positive one
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ORDER_ID = re.compile(r"ord_[0-9A-HJKMNP-TV-Z]{26}")
_MAX_DECIMAL_CHARS = 64
_EXACT = Context(prec=200)  # enough digits that products of bounded inputs are exact

DEFAULT_LIMITS = OrderLimits()
DEFAULT_PAGE_SIZE = 50
_CANCEL_ATTEMPTS = 3
MAX_PAGE_SIZE = 500


def _check_id(value: str, pattern: re.Pattern[str], field: str, description: str) -> FieldViolation | None:
    if not value:
        return FieldViolation(field, "required")
    if pattern.fullmatch(value) is None:
        return FieldViolation(field, description)
    return None


def _account_violation(account_id: str) -> FieldViolation | None:
    return _check_id(
        account_id,
        _ACCOUNT_ID,
        "account_id",
        "must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit",
    )


def _order_id_violation(order_id: str) -> FieldViolation | None:
    return _check_id(order_id, _ORDER_ID, "order_id", "is not a valid order id")


def parse_decimal(value: str) -> Decimal:
    """Parse a plain, non-negative decimal string ("12.50") into its canonical `Decimal`.

    Raises ValueError for anything else: exponents, signs, whitespace, NaN, Infinity, leading zeros.
    """
    if len(value) > _MAX_DECIMAL_CHARS:
        raise ValueError(f"must be at most {_MAX_DECIMAL_CHARS} characters")
    if _PLAIN_DECIMAL.fullmatch(value) is None:
        raise ValueError(
            "must be a plain decimal number such as 12.5: digits with at most one '.', "
            "no sign, exponent, spaces or leading zeros"
        )
    return Decimal(format_decimal(Decimal(value)))


def _decimal_places(d: Decimal) -> int:
    exponent = d.as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def _check_amount(
    field: str, value: str, *, max_value: Decimal, limits: OrderLimits, violations: list[FieldViolation]
) -> Decimal | None:
    if not value:
        violations.append(FieldViolation(field, "required"))
        return None
    if _NEGATIVE_DECIMAL.fullmatch(value) is not None:  # "-1" is a number: the same answer as for "0"
        violations.append(FieldViolation(field, "must be greater than zero"))
        return None
    try:
        amount = parse_decimal(value)
    except ValueError as error:
        violations.append(FieldViolation(field, str(error)))
        return None
    if amount <= 0:
        violations.append(FieldViolation(field, "must be greater than zero"))
        return None
    ok = True
    if _decimal_places(amount) > limits.max_decimals:
        violations.append(FieldViolation(field, f"must have at most {limits.max_decimals} decimal places"))
        ok = False
    if amount > max_value:
        violations.append(FieldViolation(field, f"must be at most {format_decimal(max_value)}"))
        ok = False
    return amount if ok else None


def parse_new_order(
    *,
    account_id: str,
    client_order_id: str,
    symbol: str,
    side: int,
    type: int,
    time_in_force: int,
    quantity: str,
    price: str,
    limits: OrderLimits,
) -> NewOrder:
    """Validate a raw request; every violation is reported at once, by proto field name."""
    violations: list[FieldViolation] = []
    for violation in (
        _account_violation(account_id),
        _check_id(
            client_order_id,
            _CLIENT_ORDER_ID,
            "client_order_id",
            "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'",
        ),
        _check_id(
            symbol,
            _SYMBOL,
            "symbol",
            "must be 1-12 upper-case letters or digits, optionally a '-' or '/' and 1-12 more",
        ),
    ):
        if violation is not None:
            violations.append(violation)

    parsed_side: Side | None = None
    if side in (Side.BUY, Side.SELL):
        parsed_side = Side(side)
    else:
        violations.append(FieldViolation("side", "must be BUY or SELL"))

    parsed_type: OrderType | None = None
    if type in (OrderType.LIMIT, OrderType.MARKET):
        parsed_type = OrderType(type)
    else:
        violations.append(FieldViolation("type", "must be LIMIT or MARKET"))

    parsed_tif: TimeInForce | None = None
    if time_in_force in (TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK):
        parsed_tif = TimeInForce(time_in_force)
        if parsed_type is OrderType.MARKET and parsed_tif is TimeInForce.GTC:
            violations.append(FieldViolation("time_in_force", "a market order cannot be GTC"))
            parsed_tif = None
    elif time_in_force == TimeInForce.UNSPECIFIED:
        if parsed_type is OrderType.LIMIT:
            parsed_tif = TimeInForce.GTC
        elif parsed_type is OrderType.MARKET:
            parsed_tif = TimeInForce.IOC
    else:
        violations.append(FieldViolation("time_in_force", "must be GTC, IOC or FOK"))

    parsed_quantity = _check_amount(
        "quantity", quantity, max_value=limits.max_quantity, limits=limits, violations=violations
    )
    parsed_price: Decimal | None = None
    if parsed_type is OrderType.MARKET:
        if price:
            violations.append(FieldViolation("price", "must be empty for a market order"))
    elif parsed_type is OrderType.LIMIT:
        if not price:
            violations.append(FieldViolation("price", "required for a limit order"))
        else:
            parsed_price = _check_amount(
                "price", price, max_value=limits.max_price, limits=limits, violations=violations
            )
    elif price:
        # Type unknown: still report a malformed price, so the caller sees every problem at once.
        parsed_price = _check_amount(
            "price", price, max_value=limits.max_price, limits=limits, violations=violations
        )

    if (
        parsed_quantity is not None
        and parsed_price is not None
        and _EXACT.multiply(parsed_quantity, parsed_price) > limits.max_notional
    ):
        violations.append(
            FieldViolation(
                "quantity", f"quantity * price must be at most {format_decimal(limits.max_notional)}"
            )
        )

    if violations:
        raise InvalidArgument(violations)
    assert parsed_side is not None and parsed_type is not None and parsed_tif is not None
    assert parsed_quantity is not None
    return NewOrder(
        account_id=account_id,
        client_order_id=client_order_id,
        symbol=symbol,
        side=parsed_side,
        type=parsed_type,
        time_in_force=parsed_tif,
        quantity=parsed_quantity,
        price=parsed_price,
    )


def validate_account_id(account_id: str) -> None:
    violation = _account_violation(account_id)
    if violation is not None:
        raise InvalidArgument(violation)


def validate_account_and_order_id(account_id: str, order_id: str) -> None:
    violations = [v for v in (_account_violation(account_id), _order_id_violation(order_id)) if v is not None]
    if violations:
        raise InvalidArgument(violations)


# --- ids and page tokens ---------------------------------------------------------------------------------


def new_order_id(now_ms: int | None = None) -> str:
    """ "ord_" + a ULID-style id: 48 bits of milliseconds then 80 random bits, Crockford base32 (26 chars)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = ((ms & (2**48 - 1)) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "ord_" + "".join(reversed(chars))


_TOKEN_VERSION = 1
_MAX_TOKEN_CHARS = 512
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_MAX_TIME_US = 2**63 - 1


def encode_page_token(cursor: PageCursor) -> str:
    payload = json.dumps(
        [_TOKEN_VERSION, cursor.account_id, cursor.create_time_us, cursor.order_id],
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    return base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")


def _bad_token() -> InvalidArgument:
    return InvalidArgument.field("page_token", "is not a valid page token for this account")


def decode_page_token(account_id: str, token: str) -> PageCursor:
    """Decode an `encode_page_token` token; anything else, or another account's, is InvalidArgument."""
    if len(token) > _MAX_TOKEN_CHARS or _TOKEN_CHARS.fullmatch(token) is None:
        raise _bad_token()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data: Any = json.loads(raw.decode("ascii"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _bad_token() from None
    if not (isinstance(data, list) and len(data) == 4):
        raise _bad_token()
    version, token_account, create_time_us, order_id = data
    if (
        version != _TOKEN_VERSION
        or type(version) is not int
        or not isinstance(token_account, str)
        or token_account != account_id
        or type(create_time_us) is not int
        or not 0 <= create_time_us <= _MAX_TIME_US
        or not isinstance(order_id, str)
        or _ORDER_ID.fullmatch(order_id) is None
    ):
        raise _bad_token()
    cursor = PageCursor(account_id, create_time_us, order_id)
    if encode_page_token(cursor) != token:  # exactly one spelling per cursor
        raise _bad_token()
    return cursor


# --- the service ----------------------------------------------------------------------------------------


class TradingCore:
    def __init__(
        self,
        store: OrderStore,
        *,
        clock_us: Callable[[], int],
        new_order_id: Callable[[], str],
        limits: OrderLimits = DEFAULT_LIMITS,
        controls: TradingControls | None = None,
    ) -> None:
        self._store = store
        self._clock_us = clock_us
        self._new_order_id = new_order_id
        self.limits = limits
        self.controls = controls

    async def place(self, new: NewOrder, api_key_id: str = "") -> tuple[Order, bool]:
        """Place `new`, or return the order an identical earlier request placed (replayed=True).

        Atomic under concurrency: the store's unique (account_id, client_order_id) decides the winner. With
        `controls`: see the module (`api_key_id`: the key that signed the call, "" for a token).
        """
        controls = self.controls
        if controls is None:
            return await self._insert(new, None)
        existing = await self._store.find(new.account_id, new.client_order_id)
        if existing is not None:
            return self._settle(existing, False, new)
        controls.kill_check(new.account_id, api_key_id, new.symbol)
        engine = controls.engine
        if engine is None:
            notional = None if new.price is None else _EXACT.multiply(new.quantity, new.price)

            def admit(covering: list[tuple[KillScope, str]], open_notional: Decimal) -> None:
                controls.refuse_if_covered(covering)

            return await self._insert(new, Admission(notional, api_key_id, admit))
        risk_order = RiskOrder(
            account_id=new.account_id,
            api_key_id=api_key_id,
            client_order_id=new.client_order_id,
            symbol=new.symbol,
            side=RiskSide(int(new.side)),
            type=RiskOrderType(int(new.type)),
            quantity=new.quantity,
            price=new.price,
        )
        checked = engine.check(risk_order, None)

        def admit_checked(covering: list[tuple[KillScope, str]], open_notional: Decimal) -> None:
            controls.refuse_if_covered(covering)
            engine.check_credit(risk_order, checked, open_notional)

        try:
            order, replayed = await self._insert(new, Admission(checked, api_key_id, admit_checked))
        except BaseException:
            engine.discard(risk_order)
            raise
        return order, replayed

    async def _insert(self, new: NewOrder, admission: Admission | None) -> tuple[Order, bool]:
        now = self._clock_us()
        candidate = Order(
            order_id=self._new_order_id(),
            account_id=new.account_id,
            client_order_id=new.client_order_id,
            symbol=new.symbol,
            side=new.side,
            type=new.type,
            time_in_force=new.time_in_force,
            quantity=new.quantity,
            price=new.price,
            status=OrderStatus.OPEN,
            create_time_us=now,
            update_time_us=now,
        )
        stored, created = await self._store.insert_if_absent(candidate, admission)
        return self._settle(stored, created, new)

    @staticmethod
    def _settle(stored: Order, created: bool, new: NewOrder) -> tuple[Order, bool]:
        if created:
            return stored, False
        if stored.same_request(new):
            return stored, True
        raise client_order_id_reused(new.client_order_id)

    async def cancel(self, account_id: str, order_id: str) -> Order:
        validate_account_and_order_id(account_id, order_id)
        for _ in range(_CANCEL_ATTEMPTS):
            order = await self._store.get(account_id, order_id)
            if order is None:
                raise order_not_found(order_id)
            if order.status is OrderStatus.CANCELED:
                return order
            if order.status is not OrderStatus.OPEN:
                raise order_not_open(order_id, order.status.name)
            updated = await self._store.transition(
                account_id, order_id, OrderStatus.OPEN, OrderStatus.CANCELED, self._clock_us()
            )
            if updated is not None:
                return updated
            # The order changed between the read and the update: look again.
        # Statuses only ever leave OPEN, so a second look always settles it; anything else is a store bug.
        raise RuntimeError(f"order {order_id} kept changing while being cancelled")

    async def get(self, account_id: str, order_id: str) -> Order:
        validate_account_and_order_id(account_id, order_id)
        order = await self._store.get(account_id, order_id)
        if order is None:
            raise order_not_found(order_id)
        return order

    async def list(self, account_id: str, page_size: int, page_token: str) -> tuple[list[Order], str]:
        violations: list[FieldViolation] = []
        account_violation = _account_violation(account_id)
        if account_violation is not None:
            violations.append(account_violation)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
        before: PageCursor | None = None
        if page_token and account_violation is None:
            try:
                before = decode_page_token(account_id, page_token)
            except InvalidArgument as error:
                violations.extend(error.violations)
        if violations:
            raise InvalidArgument(violations)
        size = page_size or DEFAULT_PAGE_SIZE
        orders = await self._store.list(account_id, size + 1, before)
        if len(orders) <= size:
            return orders, ""
        page = orders[:size]
        last = page[-1]
        return page, encode_page_token(PageCursor(account_id, last.create_time_us, last.order_id))
