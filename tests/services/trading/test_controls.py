"""The pre-trade controls (services/trading/controls.py) with the core, over real SQLite and real PostgreSQL: the
kill switch (in memory and under the store's lock), the risk checks' order of work, the credit limit with two
instances on one database, overrides and reference prices shared through the store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.trading.controls import TradingControls, validate_scope
from services.trading.core import TradingCore
from services.trading.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.trading.model import (
    Controls,
    KillScope,
    KillSwitch,
    NewOrder,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from services.trading.store import OrderStore
from services.trading.store_sqlite import SqliteOrderStore
from tradeguard.principal import Principal
from tradeguard.risk.config import parse_risk
from tradeguard.risk.model import RiskConfig, RiskRejected
from tradeguard.testing import FakeClock

from .conftest import Backend, make_new, sequential_ids

RISK = """version: 1
defaults:
  max_quantity: 100
  max_notional: 100000
  price_collar_bps: 1000
  credit_limit: 1000
  duplicate_window: 1s
  throttle: {messages: 1000, window: 1s}
accounts:
  acct-big: {credit_limit: null, max_notional: null}
reference_prices: {BTC-USD: 100}
"""


def risk_config(text: str = RISK) -> Callable[[], RiskConfig]:
    config = parse_risk(text, "risk.yaml")
    return lambda: config


def instance(
    store: OrderStore, clock: FakeClock, prefix: str = "", *, risk: bool = True, text: str = RISK
) -> TradingCore:
    controls = TradingControls(
        store, risk_config(text), clock_us=clock, risk=risk, new_switch_id=_ids(prefix)
    )
    return TradingCore(store, clock_us=clock, new_order_id=sequential_ids(prefix), controls=controls)


def _ids(prefix: str) -> Callable[[], str]:
    counter = iter(range(1, 10**9))
    return lambda: f"ks_{prefix}{next(counter)}"


def controls_of(core: TradingCore) -> TradingControls:
    assert core.controls is not None
    return core.controls


def new(coid: str, **over: Any) -> NewOrder:
    fields: dict[str, Any] = {"client_order_id": coid, "quantity": Decimal(1), "price": Decimal(100)}
    fields.update(over)
    return make_new(**fields)


OFFICER = Principal(
    "usr_officer",
    "acct-ops",
    frozenset({"trading:halt"}),
    amr=("pwd", "otp"),
    auth_time_us=1_700_000_000_000_000,
)


# --- the order of work ------------------------------------------------------------------------------------


async def test_each_check_refuses_through_the_core(store: OrderStore, clock: FakeClock) -> None:
    core = instance(store, clock)
    cases = [
        (new("q", quantity=Decimal(101)), "RISK_MAX_QUANTITY"),
        (new("c", price=Decimal("110.01")), "RISK_PRICE_COLLAR"),
        (new("n", symbol="ETH-USD"), "RISK_NO_REFERENCE_PRICE"),  # no price for it: fail closed
        (new("credit", quantity=Decimal(11)), "RISK_CREDIT_LIMIT"),  # 1100 > 1000, in the store's transaction
    ]
    for order, reason in cases:
        with pytest.raises(RiskRejected) as refused:
            await core.place(order)
        assert refused.value.reason == reason
    assert await store.list("acct-1", 10, None) == []
    placed, _ = await core.place(new("ok", quantity=Decimal(10)))  # exactly at the credit limit passes
    assert placed.status is OrderStatus.OPEN
    with pytest.raises(RiskRejected, match="credit limit"):
        await core.place(new("over", quantity=Decimal("0.01"), price=Decimal(101)))
    with pytest.raises(RiskRejected) as duplicate:
        await core.place(new("again", quantity=Decimal(10)))  # the same order under another id
    assert duplicate.value.reason == "RISK_DUPLICATE_ORDER"


async def test_a_retry_is_answered_even_in_a_halt_and_never_a_duplicate(
    store: OrderStore, clock: FakeClock
) -> None:
    core = instance(store, clock)
    first, replayed = await core.place(new("r-1"))
    assert not replayed
    await controls_of(core).engage(
        KillScope.GLOBAL, "", "halt", "usr_ops"
    )  # even a halt: the retry is answered
    for _ in range(3):
        again, replayed = await core.place(new("r-1"))
        assert replayed and again.order_id == first.order_id
    assert len(await store.list("acct-1", 10, None)) == 1


THROTTLED = RISK.replace("throttle: {messages: 1000, window: 1s}", "throttle: {messages: 2, window: 1s}")


async def test_a_retry_takes_no_place_in_the_throttle(store: OrderStore, clock: FakeClock) -> None:
    """The checks come before the idempotency lookup: a retry that passes them is found by the store's insert,
    one they refuse by the lookup after the refusal; either way it gets its order and its message is taken
    back (a throttled one never counted)."""
    core = instance(store, clock, text=THROTTLED)
    first, _ = await core.place(new("r-1"))
    for _ in range(3):
        again, replayed = await core.place(new("r-1"))
        assert replayed and again.order_id == first.order_id
    await controls_of(core).set_price("BTC-USD", Decimal(200))  # 100 is now outside the collar
    again, replayed = await core.place(new("r-1"))
    assert replayed and again.order_id == first.order_id
    await core.place(new("r-2", price=Decimal(200)))  # the second message of the window
    for coid in ("r-3", "r-4"):
        with pytest.raises(RiskRejected) as refused:
            await core.place(new(coid, price=Decimal(201)))
        assert refused.value.reason == "RISK_MESSAGE_THROTTLE"
        again, replayed = await core.place(new("r-1"))  # throttled, and still answered
        assert replayed and again.order_id == first.order_id
    assert len(await store.list("acct-1", 10, None)) == 2


async def test_a_reused_client_order_id_takes_nothing_from_the_checks(
    store: OrderStore, clock: FakeClock
) -> None:
    """Another order under a placed client_order_id passes the checks and is refused by the store's insert: it
    is neither a message nor the original of a duplicate."""
    core = instance(store, clock, text=THROTTLED)
    await core.place(new("r-1"))
    with pytest.raises(AlreadyExists):
        await core.place(new("r-1", quantity=Decimal(2)))
    placed, replayed = await core.place(new("r-2", quantity=Decimal(2)))
    assert placed.status is OrderStatus.OPEN and not replayed


async def test_an_order_refused_in_the_store_is_forgotten_by_the_engine(
    store: OrderStore, clock: FakeClock
) -> None:
    """Refused by the credit check (after the engine recorded it): the same order under a new id is not a
    duplicate of it once credit is there."""
    core = instance(store, clock)
    held, _ = await core.place(new("held", quantity=Decimal(6)))
    with pytest.raises(RiskRejected, match="credit"):
        await core.place(new("big", quantity=Decimal(5)))
    await core.cancel("acct-1", held.order_id)
    placed, _ = await core.place(new("big-2", quantity=Decimal(5)))
    assert placed.status is OrderStatus.OPEN


async def test_a_market_order_is_checked_at_the_reference_price(store: OrderStore, clock: FakeClock) -> None:
    core = instance(store, clock)
    market = {"type": OrderType.MARKET, "time_in_force": TimeInForce.IOC, "price": None}
    await core.place(new("m-1", quantity=Decimal(9), **market))  # 900 at the reference of 100
    with pytest.raises(RiskRejected, match="credit"):
        await core.place(new("m-2", quantity=Decimal(2), side=Side.SELL, **market))


async def test_with_the_risk_checks_off_only_the_kill_switch_applies(
    store: OrderStore, clock: FakeClock
) -> None:
    core = instance(store, clock, risk=False)
    await core.place(new("far", price=Decimal(1_000_000), quantity=Decimal(1000)))
    await controls_of(core).engage(KillScope.SYMBOL, "BTC-USD", "halt", "usr_ops")
    with pytest.raises(FailedPrecondition) as refused:
        await core.place(new("after"))
    assert (refused.value.reason, refused.value.metadata) == (
        "KILL_SWITCH_ENGAGED",
        {"scope": "SYMBOL", "value": "BTC-USD"},
    )


# --- the kill switch --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "value", "cancelled", "refused", "allowed"),
    [
        (KillScope.GLOBAL, "", 4, {}, None),
        (KillScope.ACCOUNT, "acct-1", 2, {}, {"account_id": "acct-2"}),
        (KillScope.SYMBOL, "ETH-USD", 2, {"symbol": "ETH-USD"}, {}),
        (KillScope.API_KEY, "key-a", 2, {"key": "key-a"}, {"key": "key-b"}),
    ],
)
async def test_engage_cancels_every_open_order_in_scope_and_refuses_new_ones(
    store: OrderStore,
    clock: FakeClock,
    scope: KillScope,
    value: str,
    cancelled: int,
    refused: dict[str, str],
    allowed: dict[str, str] | None,
) -> None:
    core = instance(store, clock, risk=False)
    placed = []
    for account, symbol, key in (
        ("acct-1", "BTC-USD", "key-a"),
        ("acct-1", "ETH-USD", "key-b"),
        ("acct-2", "ETH-USD", "key-a"),
        ("acct-2", "BTC-USD", "key-b"),
    ):
        order, _ = await core.place(new(f"o-{account}-{symbol}", account_id=account, symbol=symbol), key)
        placed.append((order, account, symbol, key))
    clock.advance(5)
    switch, count = await controls_of(core).engage(scope, value, "fat finger", "usr_ops")
    assert count == cancelled and switch.value == value and switch.engaged_by == "usr_ops"

    def in_scope(account: str, symbol: str, key: str) -> bool:
        return {
            KillScope.GLOBAL: True,
            KillScope.ACCOUNT: account == value,
            KillScope.SYMBOL: symbol == value,
            KillScope.API_KEY: key == value,
        }[scope]

    for order, account, symbol, key in placed:
        stored = await store.get(account, order.order_id)
        assert stored is not None
        expected = OrderStatus.CANCELED if in_scope(account, symbol, key) else OrderStatus.OPEN
        assert stored.status is expected
        if expected is OrderStatus.CANCELED:
            assert stored.update_time_us == switch.engaged_at_us
    blocked = {"account_id": "acct-1", "symbol": "BTC-USD", "key": "key-a"} | refused
    key = blocked.pop("key")
    with pytest.raises(FailedPrecondition, match="kill switch"):
        await core.place(new("blocked", **blocked), key)
    if allowed is not None:
        fine = {"account_id": "acct-1", "symbol": "BTC-USD", "key": "key-a"} | allowed
        key = fine.pop("key")
        await core.place(new("fine", **fine), key)
    # engaging again finds the one engaged; nothing left to cancel
    again, count = await controls_of(core).engage(scope, value, "again", "usr_other")
    assert (again.switch_id, again.engaged_by, count) == (switch.switch_id, "usr_ops", 0)


async def test_the_store_refuses_what_a_stale_instance_lets_through(
    backend: Backend, clock: FakeClock
) -> None:
    """Instance B has not yet seen A's switch (no refresh): its order is refused by the store's re-check."""
    a, b = instance(await backend.open(), clock, "A"), instance(await backend.open(), clock, "B")
    await controls_of(b).refresh()
    await controls_of(a).engage(KillScope.ACCOUNT, "acct-1", "halt", "usr_ops")
    assert controls_of(b).switches == set()  # stale
    with pytest.raises(FailedPrecondition) as refused:
        await b.place(new("slipped"))
    assert refused.value.reason == "KILL_SWITCH_ENGAGED"
    assert backend.count("orders") == 0
    assert await controls_of(b).refresh()  # the version moved: B now knows
    assert controls_of(b).switches == {(KillScope.ACCOUNT, "acct-1")}


async def test_release_needs_a_fresh_second_factor_and_keeps_history(
    store: OrderStore, clock: FakeClock
) -> None:
    core = instance(store, clock)
    controls = controls_of(core)
    await controls.engage(KillScope.SYMBOL, "BTC-USD", "halt", "usr_ops")
    login = clock() - 300_000_000  # exactly 5 minutes ago: still fresh
    for principal, fresh in [
        (Principal("u", "a", frozenset(), amr=("pwd",), auth_time_us=clock()), False),  # no second factor
        (Principal("u", "a", frozenset(), amr=("pwd", "otp"), auth_time_us=0), False),  # refreshed
        (Principal("u", "a", frozenset(), amr=("pwd", "otp"), auth_time_us=login - 1), False),  # too old
        (Principal("u", "a", frozenset(), amr=("pwd", "otp"), auth_time_us=login), True),
    ]:
        if not fresh:
            with pytest.raises(PermissionDenied) as denied:
                await controls.release(KillScope.SYMBOL, "BTC-USD", "ok", principal)
            assert denied.value.reason == "FRESH_MFA_REQUIRED"
    released = await controls.release(KillScope.SYMBOL, "BTC-USD", "all clear", principal)
    assert (released.released_by, released.released_at_us, released.release_reason) == (
        "u",
        clock(),
        "all clear",
    )
    assert controls.switches == set()
    await core.place(new("after-release"))
    with pytest.raises(NotFound) as missing:
        await controls.release(KillScope.SYMBOL, "BTC-USD", "again", OFFICER)
    assert missing.value.reason == "KILL_SWITCH_NOT_ENGAGED"
    listed = await controls.switches_listed(include_released=True)
    assert [s.switch_id for s in listed] == [released.switch_id]
    assert await controls.switches_listed(include_released=False) == []


@pytest.mark.parametrize(
    ("scope", "value"),
    [
        (0, ""),
        (9, "x"),
        (KillScope.GLOBAL, "x"),
        (KillScope.ACCOUNT, ""),
        (KillScope.SYMBOL, "btc"),
        (KillScope.API_KEY, ""),
        (KillScope.API_KEY, "a b"),
    ],
)
def test_a_scope_and_its_value_are_validated(scope: int, value: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_scope(scope, value)


async def test_a_reason_is_required(store: OrderStore, clock: FakeClock) -> None:
    with pytest.raises(InvalidArgument, match="reason"):
        await controls_of(instance(store, clock)).engage(KillScope.GLOBAL, "", "  ", "usr_ops")


async def test_switches_survive_a_restart(backend: Backend, clock: FakeClock) -> None:
    store = await backend.open()
    await controls_of(instance(store, clock)).engage(KillScope.ACCOUNT, "acct-1", "halt", "usr_ops")
    await store.close()
    restarted = instance(await backend.open(), clock)
    await controls_of(restarted).refresh()
    with pytest.raises(FailedPrecondition, match="kill switch"):
        await restarted.place(new("after-restart"))


# --- two instances on one database ------------------------------------------------------------------------


async def test_the_credit_limit_holds_across_two_instances(backend: Backend, clock: FakeClock) -> None:
    """40 orders of 100 each from two instances at once, against a limit of 1000: exactly 10 placed."""
    a, b = instance(await backend.open(), clock, "A"), instance(await backend.open(), clock, "B")
    orders = [
        (a if i % 2 else b).place(new(f"c-{i}", price=Decimal(100) + Decimal(i) / 100)) for i in range(40)
    ]
    results = await asyncio.gather(*orders, return_exceptions=True)
    placed = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, RiskRejected) and r.reason == "RISK_CREDIT_LIMIT" for r in refused), refused
    assert len(placed) == 9  # 100.xx each: nine fit under 1000, a tenth would not
    open_total = sum(
        o.quantity * (o.price or 0)
        for o in await a._store.list("acct-1", 100, None)
        if o.status is OrderStatus.OPEN
    )
    assert open_total <= 1000


async def test_engage_and_inserts_racing_leave_no_open_order_in_scope(
    backend: Backend, clock: FakeClock
) -> None:
    """Orders from a second instance while the first engages: whatever went in before the switch was cancelled
    by it, and nothing went in after."""
    a = instance(await backend.open(), clock, "A", risk=False)
    b = instance(await backend.open(), clock, "B", risk=False)

    async def flood() -> None:
        for i in range(60):
            with contextlib.suppress(FailedPrecondition):
                await b.place(new(f"f-{i}", account_id="acct-big"))

    flooding = asyncio.ensure_future(flood())
    await asyncio.sleep(0)
    await controls_of(a).engage(KillScope.ACCOUNT, "acct-big", "halt", "usr_ops")
    await flooding
    orders = await a._store.list("acct-big", 100, None)
    assert all(o.status is OrderStatus.CANCELED for o in orders)


async def test_overrides_and_prices_reach_the_other_instance(backend: Backend, clock: FakeClock) -> None:
    a, b = instance(await backend.open(), clock, "A"), instance(await backend.open(), clock, "B")
    await controls_of(b).refresh()
    await controls_of(a).set_limits(
        "acct-1", {"max_quantity": "5", "restricted_symbols": ["DOGE-USD"]}, "usr_r"
    )
    await controls_of(a).set_price("ETH-USD", Decimal(2000))
    assert await controls_of(b).refresh()
    limits, source, override = controls_of(b).effective_limits("acct-1")
    assert (limits.max_quantity, source, override) == (
        Decimal(5),
        "file:defaults+override",
        {"max_quantity": "5", "restricted_symbols": ["DOGE-USD"]},
    )
    assert limits.credit_limit == Decimal(1000)  # not overridden: the file's
    assert controls_of(b).prices.price("ETH-USD") == Decimal(2000)
    with pytest.raises(RiskRejected, match="quantity"):
        await b.place(new("q", quantity=Decimal(6)))
    await b.place(new("eth", symbol="ETH-USD", price=Decimal(2000), quantity=Decimal("0.1")))
    await controls_of(a).set_limits("acct-1", None, "usr_r")
    await controls_of(b).refresh()
    assert controls_of(b).effective_limits("acct-1")[1:] == ("file:defaults", None)


async def test_a_live_price_goes_stale_and_then_refuses(store: OrderStore, clock: FakeClock) -> None:
    controls = TradingControls(store, risk_config(), clock_us=clock, price_max_age_us=1_000)
    await controls.set_price("BTC-USD", Decimal(90))
    assert controls.prices.price("BTC-USD") == Decimal(90)  # the live price wins over the file's 100
    clock.advance(1_001)
    assert controls.prices.price("BTC-USD") is None  # stale: not the file's price either (fail closed)
    never = TradingControls(store, risk_config(), clock_us=clock, price_max_age_us=0)
    await never.refresh()
    clock.advance(10**12)
    assert never.prices.price("BTC-USD") == Decimal(90)


# --- the credit limit, as a property ----------------------------------------------------------------------

CREDIT_ONLY = """version: 1
defaults: {credit_limit: 1000}
reference_prices: {BTC-USD: 100}
"""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 60), st.booleans()),  # quantity, price, cancel it after
        min_size=1,
        max_size=25,
    )
)
def test_an_order_is_refused_exactly_when_it_would_pass_the_credit_limit(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, int, bool]]
) -> None:
    async def scenario() -> None:
        path = tmp_path_factory.mktemp("credit") / "orders.sqlite3"
        store = await SqliteOrderStore.open(path)
        try:
            clock = FakeClock()
            core = instance(store, clock, text=CREDIT_ONLY)
            open_total = Decimal(0)
            for i, (quantity, price, cancel) in enumerate(steps):
                notional = Decimal(quantity * price)
                order = new(f"p-{i}", quantity=Decimal(quantity), price=Decimal(price))
                if open_total + notional > 1000:
                    with pytest.raises(RiskRejected) as refused:
                        await core.place(order)
                    assert refused.value.reason == "RISK_CREDIT_LIMIT"
                    assert refused.value.metadata["actual"] == str(open_total + notional)
                    continue
                placed, _ = await core.place(order)
                open_total += notional
                if cancel:
                    await core.cancel("acct-1", placed.order_id)
                    open_total -= notional
        finally:
            await store.close()

    asyncio.run(scenario())


async def test_an_older_read_never_replaces_a_newer_one(store: OrderStore, clock: FakeClock) -> None:
    controls = TradingControls(store, risk_config(), clock_us=clock)
    switch = KillSwitch("ks_1", KillScope.GLOBAL, "", "halt", "usr", 1)
    controls.apply(Controls(5, [switch]))
    controls.apply(Controls(4, []))  # read before the engage, applied after it
    assert (controls.version, controls.switches) == (5, {(KillScope.GLOBAL, "")})
    controls.apply(Controls(6, []))
    assert controls.switches == set()


async def test_with_the_risk_checks_off_a_retry_is_answered_with_or_without_a_switch(
    store: OrderStore, clock: FakeClock
) -> None:
    core = instance(store, clock, risk=False)
    first, _ = await core.place(new("r-1"))
    again, replayed = await core.place(new("r-1"))  # no switch: the store's insert finds it
    assert replayed and again.order_id == first.order_id
    await controls_of(core).engage(KillScope.ACCOUNT, "acct-2", "halt", "usr_ops")
    again, replayed = await core.place(new("r-1"))  # a switch engaged: looked up first
    assert replayed and again.order_id == first.order_id
    with pytest.raises(AlreadyExists):
        await core.place(new("r-1", quantity=Decimal(2)))
