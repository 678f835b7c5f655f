"""The trading core: idempotent placement, cancellation and paging (validation: services/trading/validation.py,
whose names are re-exported here).

With `controls` (services/trading/controls.py), placing an order is, in this order: the kill switch (in memory)
→ the risk checks (`RiskEngine.check`, credit left to the store) → the store's insert transaction, which finds
an order already placed under the same client_order_id (a retry: that order is returned, never admitted again)
and otherwise, under its lock, re-checks the kill switch and runs the credit check on the account's open
notional (`Admission`). The idempotency lookup comes after the checks, not before them: made only when the kill
switch or a check refuses (a retry of a placed order then gets that order back, whatever the switches, limits
or prices now say), else left to the insert. A retry's message is taken back from the engine (`retract`), so
it is never a message twice (nor a duplicate: the engine knows its client_order_id). If the order is not placed
after the risk checks passed (refused in the store, or its client_order_id another order's), the engine forgets
the record it made of it (`discard`), so a corrected order is not taken for its duplicate. With the risk checks
off, the same holds with nothing to take back (the lookup first only while a switch is engaged, as last read).

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
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from services.trading.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
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
)
from services.trading.validation import (
    DEFAULT_LIMITS,
    EXACT,
    ORDER_ID,
    account_of,
    account_violation,
    parse_decimal,
    parse_new_order,
    validate_account_and_order_id,
    validate_account_id,
)
from tradeguard.risk.model import OrderType as RiskOrderType
from tradeguard.risk.model import RiskOrder, RiskRejected
from tradeguard.risk.model import Side as RiskSide

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "TradingCore",
    "account_of",
    "decode_page_token",
    "encode_page_token",
    "new_order_id",
    "parse_decimal",
    "parse_new_order",
    "validate_account_and_order_id",
    "validate_account_id",
]

if TYPE_CHECKING:
    from services.trading.controls import TradingControls
    from services.trading.store import OrderStore
    from tradeguard.risk.checks import RiskEngine


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RISK_SIDES: Final = {side: RiskSide(int(side)) for side in Side}
_RISK_TYPES: Final = {kind: RiskOrderType(int(kind)) for kind in OrderType}
DEFAULT_PAGE_SIZE = 50
_CANCEL_ATTEMPTS = 3
MAX_PAGE_SIZE = 500


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
        or ORDER_ID.fullmatch(order_id) is None
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
        engine = controls.engine
        if engine is None:
            notional = None if new.price is None else EXACT.multiply(new.quantity, new.price)

            def admit(covering: list[tuple[KillScope, str]], open_notional: Decimal) -> None:
                controls.refuse_if_covered(covering)

            # Nothing before the store can refuse a retry unless a switch is engaged: then look first; else the
            # store's insert finds the existing order itself (and never admits it again).
            if controls.switches:
                existing = await self._store.find(new.account_id, new.client_order_id)
                if existing is not None:
                    return self._settle(existing, False, new)
                controls.kill_check(new.account_id, api_key_id, new.symbol)
            return await self._insert(new, Admission(notional, api_key_id, admit))
        return await self._place_checked(new, api_key_id, controls, engine)

    async def _place_checked(
        self, new: NewOrder, api_key_id: str, controls: TradingControls, engine: RiskEngine
    ) -> tuple[Order, bool]:
        """Every control on, the checks before the idempotency lookup (see the module)."""
        risk_order = RiskOrder(
            new.account_id,
            api_key_id,
            new.client_order_id,
            new.symbol,
            _RISK_SIDES[new.side],
            _RISK_TYPES[new.type],
            new.quantity,
            new.price,
        )
        now = self._clock_us()
        try:
            if controls.switches:
                controls.kill_check(new.account_id, api_key_id, new.symbol)
            checked = engine.check(risk_order, None, now_us=now)
        except FailedPrecondition as refusal:
            # Refused: unless it is a retry of a placed order, which gets that order back (and takes nothing)
            existing = await self._store.find(new.account_id, new.client_order_id)
            if existing is None:
                raise
            if isinstance(refusal, RiskRejected):
                engine.retract(risk_order, now, refusal)
            return self._settle(existing, False, new)

        def admit_checked(covering: list[tuple[KillScope, str]], open_notional: Decimal) -> None:
            if covering:
                controls.refuse_if_covered(covering)
            engine.check_credit(risk_order, checked, open_notional)

        try:
            stored, created = await self._insert_new(new, Admission(checked, api_key_id, admit_checked))
        except BaseException:
            engine.discard(risk_order, now)
            raise
        if not created:  # the store's insert found the order placed before: a retry, or a reused id
            engine.retract(risk_order, now)
            if not stored.same_request(new):
                engine.discard(risk_order, now)
        return self._settle(stored, created, new)

    async def _insert(self, new: NewOrder, admission: Admission | None) -> tuple[Order, bool]:
        stored, created = await self._insert_new(new, admission)
        return self._settle(stored, created, new)

    async def _insert_new(self, new: NewOrder, admission: Admission | None) -> tuple[Order, bool]:
        """The store's insert: (the order stored, whether this call created it)."""
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
        return await self._store.insert_if_absent(candidate, admission)

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
        bad_account = account_violation(account_id)
        if bad_account is not None:
            violations.append(bad_account)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
        before: PageCursor | None = None
        if page_token and bad_account is None:
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
