"""The pre-trade risk engine: every check on one new order, in a few microseconds, in process.

`RiskEngine(config, prices, clock_us)` reads the limits in force through `config()` on every call (a reload
swaps them: pass `lambda: watched.current`), reference prices from `prices` (tradeguard/risk/reference.py) and
the time from `clock_us` (injected; never the wall clock directly). `check(order, open_notional)` raises
`RiskRejected` (a FailedPrecondition; reason = the check's code, metadata = the values that failed) at the first
check that fails, else returns the order's notional value (quantity x price, or x the reference price for a
market order; None for a market order when no limit needs it). The checks, in order:

1. `RISK_MESSAGE_THROTTLE`: at most `throttle.messages` orders of the account pass this point in any sliding
   window of `throttle.window_us` (the message counts from here on, even if a later check rejects the order; a
   throttled one does not count). The rejection carries RetryInfo (when the oldest message leaves the window).
2. `RISK_RESTRICTED_SYMBOL`: the symbol is in the account's restricted list (the file's global list included).
3. `RISK_MAX_QUANTITY`: quantity > max_quantity (exactly at the limit passes).
4. `RISK_NO_REFERENCE_PRICE` / `RISK_PRICE_COLLAR`: a limit order, with a collar configured, needs a reference
   price (none, or a stale one: fail closed) and must lie within reference x (1 ± collar), edges included. A
   market order has no price to collar; if its notional is checked (max_notional or credit_limit) it needs the
   reference price for that, else it too fails closed with `RISK_NO_REFERENCE_PRICE`.
5. `RISK_MAX_NOTIONAL`: notional > max_notional.
6. `RISK_CREDIT_LIMIT` (only when `open_notional` is given): open_notional + notional > credit_limit
   (`credit_check`, a pure function; see "Credit" below).
7. `RISK_DUPLICATE_ORDER`: an order with the same account, symbol, side, quantity and price (decimals by value)
   was accepted by this engine less than the account's `duplicate_window_us` ago under ANOTHER client_order_id.
   An order that passes every check is recorded as accepted.

Decimal arithmetic uses a private context of 200 digits: products and sums of order-sized values are exact, so
a boundary is never decided by rounding.

Idempotent retries. A retry with the same client_order_id is never a duplicate: the record of the same
client_order_id is excluded (and left as it was: a retry within the window does not move it). A caller that
runs `check` before its idempotency lookup (the trading core does: it looks up only when a check refuses, and
otherwise lets the store's insert find the placed order) learns only afterwards that the order was a retry of
one already placed; it then calls `retract(order, now_us)` with the time it passed to `check`, which takes back
the message that check counted, so that a replay is never a message twice. Until then the retry holds one place
in the account's throttle: fail closed, never a message more than the limit. When an order passed `check` but
was then not placed (the store refused it, the credit check in the store transaction failed, or its
client_order_id turned out to be another order's), call `discard(order, now_us)` so that a corrected order under
a new client_order_id is not taken for a duplicate of it (with `now_us`, only the record that check made goes: a
retry's record is the placed order's).

Credit (two trading instances on one PostgreSQL). The credit check is `credit_check(limit, open_notional,
notional)`: pure. Its input must be exact at the moment of the insert, so a store computes `open_notional` (the
sum of the notional of the account's OPEN orders) INSIDE the transaction that inserts the order, after taking a
per-account lock (e.g. `SELECT ... FOR UPDATE` on the account's row, or `pg_advisory_xact_lock(hash of
account_id)`), calls `engine.check_credit(order, notional, open_notional)` there, and inserts only if it
returns; the notional stored with the order is the one `check` returned. Then two instances serialise on the
account and can never both pass on the same headroom. A caller doing this passes `open_notional=None` to
`check` (the credit check is then left to the store); a single-process caller with an exact in-memory sum may
pass it to `check` directly.

Memory (bounded whatever the callers send):
- duplicates: at most `max_duplicates` records (one per accepted order within the longest window), each keyed
  by a 64-bit digest (Python's hash of (account, symbol, side, quantity, price); str hashing is randomised per
  process, so a collision cannot be aimed at; by chance, about 2^-64 per pair, it could only make an order a
  false duplicate, never let a duplicate through). Records older than the longest window in force are dropped
  as new ones come (oldest first); at the bound the oldest record is evicted even if still in its window (a
  flood beyond the bound shortens the window; it never blocks an order).
- throttle: at most `max_accounts` accounts, least recently seen evicted first, each keeping at most
  `throttle.messages` timestamps (the config bounds that to MAX_THROTTLE_MESSAGES). An evicted account starts
  afresh: only more than `max_accounts` distinct accounts active within one window could shorten a throttle.

Not thread-safe: call it from one event loop (every call is synchronous and short; nothing awaits).
"""

from __future__ import annotations

import contextlib
import decimal
from collections import OrderedDict, deque
from collections.abc import Callable
from decimal import Decimal
from typing import Final

from tradeguard.risk.model import (
    AccountLimits,
    RiskCheck,
    RiskConfig,
    RiskOrder,
    RiskRejected,
    Throttle,
    plain,
)
from tradeguard.risk.reference import ReferencePrices

__all__ = ["DEFAULT_MAX_ACCOUNTS", "DEFAULT_MAX_DUPLICATES", "RiskEngine", "credit_check"]

DEFAULT_MAX_DUPLICATES: Final = 200_000
DEFAULT_MAX_ACCOUNTS: Final = 10_000

_CONTEXT: Final = decimal.Context(
    prec=200, traps=[decimal.InvalidOperation, decimal.Overflow, decimal.DivisionByZero]
)
_multiply = _CONTEXT.multiply
_add = _CONTEXT.add
_subtract = _CONTEXT.subtract


def credit_check(limit: Decimal | None, open_notional: Decimal, notional: Decimal, order: RiskOrder) -> None:
    """`RISK_CREDIT_LIMIT` if open_notional + notional > limit (exactly at the limit passes; None: no limit)."""
    if limit is None:
        return
    total = _add(open_notional, notional)
    if total > limit:
        raise RiskRejected(
            RiskCheck.CREDIT_LIMIT,
            order,
            plain(limit),
            plain(total),
            {"open_notional": plain(open_notional), "order_notional": plain(notional)},
        )


class RiskEngine:
    """The pre-trade checks of an account's new orders (see the module)."""

    def __init__(
        self,
        config: Callable[[], RiskConfig],
        prices: ReferencePrices,
        clock_us: Callable[[], int],
        *,
        max_duplicates: int = DEFAULT_MAX_DUPLICATES,
        max_accounts: int = DEFAULT_MAX_ACCOUNTS,
    ) -> None:
        if max_duplicates <= 0 or max_accounts <= 0:
            raise ValueError("max_duplicates and max_accounts must be positive")
        self._config = config
        self._prices = prices
        self._clock_us = clock_us
        self.max_duplicates = max_duplicates
        self.max_accounts = max_accounts
        # OrderedDicts, not dicts: taking the oldest is O(1) (a dict skips the slots its deletions left)
        self._accepted: OrderedDict[int, tuple[int, str]] = (
            OrderedDict()
        )  # digest -> (at µs, client_order_id)
        self._messages: OrderedDict[str, deque[int]] = OrderedDict()  # account -> admitted times, LRU first

    # --- the checks ---------------------------------------------------------------------------------------

    def check(
        self, order: RiskOrder, open_notional: Decimal | None = None, *, now_us: int | None = None
    ) -> Decimal | None:
        """Every check on a new order (see the module) at `now_us` (default: the engine's clock); its notional,
        or `RiskRejected`."""
        config = self._config()
        limits = config.accounts.get(order.account_id, config.defaults)
        now = self._clock_us() if now_us is None else now_us
        if limits.throttle is not None:
            self._throttle(order, limits.throttle, now)
        if order.symbol in limits.restricted_symbols:
            raise RiskRejected(RiskCheck.RESTRICTED_SYMBOL, order, "restricted", order.symbol)
        quantity = order.quantity
        if limits.max_quantity is not None and quantity > limits.max_quantity:
            raise RiskRejected(RiskCheck.MAX_QUANTITY, order, plain(limits.max_quantity), plain(quantity))
        price = order.price
        if price is not None:
            if limits.price_collar is not None:
                self._collar(order, price, limits.price_collar)
            notional: Decimal | None = _multiply(quantity, price)
        elif limits.needs_reference:
            reference = self._prices.price(order.symbol)
            if reference is None:
                raise RiskRejected(RiskCheck.NO_REFERENCE_PRICE, order, "a current reference price", "none")
            notional = _multiply(quantity, reference)
        else:
            notional = None
        if notional is not None:
            if limits.max_notional is not None and notional > limits.max_notional:
                raise RiskRejected(RiskCheck.MAX_NOTIONAL, order, plain(limits.max_notional), plain(notional))
            if open_notional is not None:
                credit_check(limits.credit_limit, open_notional, notional, order)
        if limits.duplicate_window_us > 0:
            self._duplicate(order, limits.duplicate_window_us, config.max_duplicate_window_us, now)
        return notional

    def check_credit(self, order: RiskOrder, notional: Decimal | None, open_notional: Decimal) -> None:
        """The credit check alone, with the account's limit in force: for the store's transaction (see the
        module). `notional` is what `check` returned (None only when no notional limit applied)."""
        if notional is not None:
            config = self._config()
            limits = config.accounts.get(order.account_id, config.defaults)
            credit_check(limits.credit_limit, open_notional, notional, order)

    def limits_for(self, account_id: str) -> AccountLimits:
        return self._config().limits_for(account_id)

    def discard(self, order: RiskOrder, now_us: int | None = None) -> None:
        """Forget that `order` was accepted (it was not placed after all): see the module. With `now_us`, only
        if `check(order, now_us=now_us)` made the record (a retry's record is the order placed before)."""
        key = _digest(order)
        record = self._accepted.get(key)
        if (
            record is not None
            and record[1] == order.client_order_id
            and (now_us is None or record[0] == now_us)
        ):
            del self._accepted[key]

    def retract(self, order: RiskOrder, now_us: int, refused: RiskRejected | None = None) -> None:
        """Take back the message `check(order, now_us=now_us)` counted, the order having turned out to be a
        retry of one already placed (see the module). `refused`: that check's rejection, if it refused the
        order (a throttled order was never counted)."""
        if refused is not None and refused.check is RiskCheck.MESSAGE_THROTTLE:
            return
        times = self._messages.get(order.account_id)
        if times is not None:
            with contextlib.suppress(ValueError):  # gone already (the account evicted)
                times.remove(now_us)

    # --- the stateful checks ------------------------------------------------------------------------------

    def _collar(self, order: RiskOrder, price: Decimal, collar: Decimal) -> None:
        reference = self._prices.price(order.symbol)
        if reference is None:
            raise RiskRejected(RiskCheck.NO_REFERENCE_PRICE, order, "a current reference price", "none")
        band = _multiply(reference, collar)
        if price > reference:
            bound = _add(reference, band)
            if price <= bound:
                return
        else:
            bound = _subtract(reference, band)
            if price >= bound:
                return
        extra = {"reference_price": plain(reference), "collar": plain(collar)}
        raise RiskRejected(RiskCheck.PRICE_COLLAR, order, plain(bound), plain(price), extra)

    def _throttle(self, order: RiskOrder, throttle: Throttle, now: int) -> None:
        messages = self._messages
        account = order.account_id
        times = messages.get(account)
        if times is None:
            if len(messages) >= self.max_accounts:
                messages.popitem(last=False)  # the least recently seen account
            times = messages[account] = deque(maxlen=throttle.messages)
        else:
            messages.move_to_end(account)  # the most recently seen, last
            if times.maxlen != throttle.messages:  # the limit changed by a reload
                times = messages[account] = deque(times, maxlen=throttle.messages)
        if len(times) == throttle.messages and now - times[0] < throttle.window_us:
            error = RiskRejected(
                RiskCheck.MESSAGE_THROTTLE,
                order,
                f"{throttle.messages} per {throttle.window_us}us",
                f"{throttle.messages + 1} in {now - times[0]}us",
            )
            error.retry_after_seconds = (times[0] + throttle.window_us - now) / 1_000_000
            raise error
        times.append(now)

    def _duplicate(self, order: RiskOrder, window_us: int, longest_us: int, now: int) -> None:
        accepted = self._accepted
        key = _digest(order)
        record = accepted.get(key)
        if record is not None:
            age = now - record[0]
            if age < window_us:
                if record[1] == order.client_order_id:
                    return  # a retry: its record stays as it was
                raise RiskRejected(
                    RiskCheck.DUPLICATE_ORDER,
                    order,
                    f"{window_us}us",
                    f"{age}us",
                    {"original_client_order_id": record[1]},
                )
            del accepted[key]  # recorded again below, as the newest
        self._expire(now - longest_us)
        if len(accepted) >= self.max_duplicates:
            accepted.popitem(last=False)
        accepted[key] = (now, order.client_order_id)

    def _expire(self, before_us: int) -> None:
        """Drop the records accepted at or before `before_us` (they are out of every window), oldest first."""
        accepted = self._accepted
        while accepted:
            key = next(iter(accepted))
            if accepted[key][0] > before_us:
                return
            accepted.popitem(last=False)

    # --- for tests and metrics ----------------------------------------------------------------------------

    @property
    def duplicate_records(self) -> int:
        return len(self._accepted)

    @property
    def throttled_accounts(self) -> int:
        return len(self._messages)


def _digest(order: RiskOrder) -> int:
    return hash((order.account_id, order.symbol, int(order.side), order.quantity, order.price))
