"""Order validation: whose orders a call acts for (`account_of`), and raw requests checked into canonical
`NewOrder`s (`parse_new_order`: every violation reported at once, by proto field name), decimals parsed only from
plain decimal strings (`parse_decimal`), ids checked.

Pure: no grpc, no protobuf, no I/O.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal
from typing import TYPE_CHECKING

from services.trading.errors import FieldViolation, InvalidArgument, account_not_allowed
from services.trading.model import NewOrder, OrderLimits, OrderType, Side, TimeInForce, format_decimal
from tradeguard.errors import Unauthenticated

if TYPE_CHECKING:
    from tradeguard.principal import Principal

__all__ = [
    "DEFAULT_LIMITS",
    "EXACT",
    "ORDER_ID",
    "account_of",
    "account_violation",
    "parse_decimal",
    "parse_new_order",
    "validate_account_and_order_id",
    "validate_account_id",
]


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
ORDER_ID = re.compile(r"ord_[0-9A-HJKMNP-TV-Z]{26}")
_MAX_DECIMAL_CHARS = 64
EXACT = Context(prec=200)  # enough digits that products of bounded inputs are exact

DEFAULT_LIMITS = OrderLimits()


def _check_id(value: str, pattern: re.Pattern[str], field: str, description: str) -> FieldViolation | None:
    if not value:
        return FieldViolation(field, "required")
    if pattern.fullmatch(value) is None:
        return FieldViolation(field, description)
    return None


def account_violation(account_id: str) -> FieldViolation | None:
    return _check_id(
        account_id,
        _ACCOUNT_ID,
        "account_id",
        "must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit",
    )


def _order_id_violation(order_id: str) -> FieldViolation | None:
    return _check_id(order_id, ORDER_ID, "order_id", "is not a valid order id")


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
        account_violation(account_id),
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
        and EXACT.multiply(parsed_quantity, parsed_price) > limits.max_notional
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
    violation = account_violation(account_id)
    if violation is not None:
        raise InvalidArgument(violation)


def validate_account_and_order_id(account_id: str, order_id: str) -> None:
    violations = [v for v in (account_violation(account_id), _order_id_violation(order_id)) if v is not None]
    if violations:
        raise InvalidArgument(violations)
