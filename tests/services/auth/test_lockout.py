"""Lockout (services/auth/lockout.py) on the real hot states (in process and Redis): the pair locks first, the
account only from several sources, growing backoff, attempts refused while locked not counted, IPv6 /64 sources,
password spraying, unlock, and every failure, lock and unlock logged with its cause."""

from __future__ import annotations

import ipaddress
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from services.auth.hot import HotState
from services.auth.lockout import (
    Lock,
    Lockout,
    LockoutPolicy,
    Threshold,
    account_principal,
    key_principal,
    source_key,
    unknown_account,
)
from services.auth.settings import LockoutSettings
from tradeguard.testing import FakeClock

ALICE = account_principal("usr_alice")
S = 1_000_000


async def fail(
    lockout: Lockout, source: str, principal: str = ALICE, epoch: int = 1, cause: str = "wrong password"
) -> Lock | None:
    """One attempt as the user core makes it: ask for a lock, then record the failure with that answer."""
    lock = await lockout.locked(principal, epoch, source)
    await lockout.record_failure(principal, epoch, source, cause, lock=lock)
    return lock


def test_threshold_backoff_doubles_up_to_the_maximum() -> None:
    threshold = Threshold(5, 900 * S, 30 * S, 3600 * S)
    assert [threshold.lock_us(n) for n in (1, 4)] == [None, None]
    assert [(threshold.lock_us(n) or 0) // S for n in range(5, 13)] == [
        30,
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
    ]
    assert threshold.lock_us(10_000) == 3600 * S
    with pytest.raises(ValueError):
        Threshold(0, 1, 1, 1)
    with pytest.raises(ValueError):
        Threshold(5, 900 * S, 60 * S, 30 * S)  # max below base


def test_policy_from_settings_and_the_ordering_rule() -> None:
    policy = LockoutPolicy.from_settings(LockoutSettings())
    assert (policy.pair.failures, policy.account.failures, policy.key.failures, policy.source.failures) == (
        5,
        20,
        20,
        100,
    )
    assert (policy.pair.window_us, policy.pair.base_lock_us, policy.pair.max_lock_us) == (
        900 * S,
        30 * S,
        3600 * S,
    )
    assert policy.principal(key_principal("tgk_x")) is policy.key
    assert policy.principal(ALICE) is policy.account
    with pytest.raises(ValueError, match="above the pair"):
        LockoutPolicy(pair=Threshold(5, S, S, S), account=Threshold(5, S, S, S))


def test_sources() -> None:
    assert source_key("203.0.113.7") == "203.0.113.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("[2001:db8::1]") == "2001:db8::/64"
    assert source_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert source_key("") == source_key("not an address") == "unknown"
    assert unknown_account("ghost") == unknown_account("ghost") != unknown_account("ghosT")
    assert len(unknown_account("x" * 10_000)) == len("unknown-") + 32


async def test_the_pair_locks_first_and_other_sources_are_not_locked(
    hot_state: HotState, clock: FakeClock
) -> None:
    lockout = Lockout(hot_state, clock)
    for _ in range(4):
        assert await fail(lockout, "203.0.113.7") is None
    assert await lockout.locked(ALICE, 1, "203.0.113.7") is None
    await fail(lockout, "203.0.113.7")  # the 5th
    lock = await lockout.locked(ALICE, 1, "203.0.113.7")
    assert lock == Lock("pair", clock.now_us + 30 * S)
    assert await lockout.locked(ALICE, 1, "198.51.100.1") is None  # the user from elsewhere: not locked
    assert await hot_state.locked_until(ALICE, clock.now_us) is None  # nor the account


async def test_one_source_cannot_lock_the_account_however_hard_it_tries(
    hot_state: HotState, clock: FakeClock
) -> None:
    """An hour of attempts from one address, retrying as soon as each pair lock ends: the account stays open
    (at most `pair` failures of a source count towards it per window)."""
    lockout = Lockout(hot_state, clock)
    attempts = refused = 0
    while attempts < 400:
        lock = await fail(lockout, "203.0.113.7")
        attempts += 1
        if lock is not None:
            refused += 1
            clock.advance(max(1, lock.until_us - clock.now_us))  # wait until it ends, then try again
        else:
            clock.advance_s(1)
    assert refused > 0
    assert await hot_state.locked_until(ALICE, clock.now_us) is None
    assert await lockout.locked(ALICE, 1, "198.51.100.1") is None  # the real user logs in from home


async def test_three_sources_cannot_lock_the_account_four_can(hot_state: HotState, clock: FakeClock) -> None:
    lockout = Lockout(hot_state, clock)
    for source in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        for _ in range(50):  # far past their pair locks
            await fail(lockout, source)
    assert await hot_state.locked_until(ALICE, clock.now_us) is None  # 3 x 5 = 15 < 20
    for _ in range(5):
        await fail(lockout, "203.0.113.4")
    assert await hot_state.locked_until(ALICE, clock.now_us) == clock.now_us + 30 * S  # 20: the account
    assert await lockout.locked(ALICE, 1, "198.51.100.1") == Lock("principal", clock.now_us + 30 * S)


async def test_many_sources_one_attempt_each_lock_only_at_the_account_threshold(
    hot_state: HotState, clock: FakeClock
) -> None:
    lockout = Lockout(hot_state, clock)
    for i in range(19):
        await fail(lockout, f"198.18.0.{i}")
    assert await hot_state.locked_until(ALICE, clock.now_us) is None
    await fail(lockout, "198.18.0.200")
    assert await hot_state.locked_until(ALICE, clock.now_us) is not None


async def test_ipv6_addresses_of_one_64_are_one_source(hot_state: HotState, clock: FakeClock) -> None:
    lockout = Lockout(hot_state, clock)
    for i in range(5):
        await fail(lockout, f"2001:db8:aa:bb::{i + 1:x}")
    assert (await lockout.locked(ALICE, 1, "2001:db8:aa:bb:ffff::1")) is not None  # another address, same /64
    assert await lockout.locked(ALICE, 1, "2001:db8:aa:bc::1") is None


async def test_backoff_grows_and_attempts_while_locked_are_not_counted(
    hot_state: HotState, clock: FakeClock
) -> None:
    lockout = Lockout(hot_state, clock)
    for _ in range(5):
        await fail(lockout, "203.0.113.7")
    first = await lockout.locked(ALICE, 1, "203.0.113.7")
    assert first is not None and first.until_us - clock.now_us == 30 * S
    for _ in range(20):  # refused while locked: logged, not counted, the lock does not grow
        assert await fail(lockout, "203.0.113.7") == first
    assert await lockout.locked(ALICE, 1, "203.0.113.7") == first
    clock.advance(first.until_us - clock.now_us)
    assert await lockout.locked(ALICE, 1, "203.0.113.7") is None  # the lock ended
    await fail(lockout, "203.0.113.7")  # the 6th counted failure
    second = await lockout.locked(ALICE, 1, "203.0.113.7")
    assert second is not None and second.until_us - clock.now_us == 60 * S
    clock.advance(second.until_us - clock.now_us)
    await fail(lockout, "203.0.113.7")
    third = await lockout.locked(ALICE, 1, "203.0.113.7")
    assert third is not None and third.until_us - clock.now_us == 120 * S


async def test_failures_age_out_of_the_window(hot_state: HotState, clock: FakeClock) -> None:
    lockout = Lockout(hot_state, clock)
    for _ in range(4):
        await fail(lockout, "203.0.113.7")
    clock.advance_s(901)
    await fail(lockout, "203.0.113.7")
    assert await lockout.locked(ALICE, 1, "203.0.113.7") is None  # 1 failure in the window, not 5


async def test_success_clears_the_pair_only(hot_state: HotState, clock: FakeClock) -> None:
    lockout = Lockout(hot_state, clock)
    for source in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        for _ in range(4):
            await fail(lockout, source)
    await lockout.record_success(ALICE, 1, "203.0.113.1")
    for _ in range(4):
        await fail(lockout, "203.0.113.1")
    assert await lockout.locked(ALICE, 1, "203.0.113.1") is None  # its pair count started again...
    for _ in range(4):
        await fail(lockout, "203.0.113.4")
    assert (
        await lockout.locked(ALICE, 1, "203.0.113.9") is not None
    )  # ...but the account's did not: 20 reached


async def test_spraying_locks_the_source(hot_state: HotState, clock: FakeClock) -> None:
    lockout = Lockout(hot_state, clock)
    for i in range(100):  # one attempt against each of 100 users
        await fail(lockout, "203.0.113.66", principal=account_principal(f"usr_{i}"))
    lock = await lockout.locked(account_principal("usr_new"), 1, "203.0.113.66")
    assert lock == Lock("source", clock.now_us + 30 * S)
    assert await lockout.locked(account_principal("usr_new"), 1, "203.0.113.67") is None


async def test_unlock_lifts_the_account_and_a_new_epoch_every_pair(
    hot_state: HotState, clock: FakeClock
) -> None:
    lockout = Lockout(hot_state, clock)
    for source in ("203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"):
        for _ in range(5):
            await fail(lockout, source)
    assert await lockout.locked(ALICE, 1, "203.0.113.1") is not None
    await lockout.unlock_principal(ALICE, cause="operator unlock")
    assert await hot_state.locked_until(ALICE, clock.now_us) is None
    assert await lockout.locked(ALICE, 1, "203.0.113.1") == Lock("pair", clock.now_us + 30 * S)  # old epoch
    assert await lockout.locked(ALICE, 2, "203.0.113.1") is None  # the user's version moved: pairs released
    await fail(lockout, "203.0.113.9", epoch=2)
    assert await hot_state.locked_until(ALICE, clock.now_us) is None  # the account's count was cleared too


async def test_keys_have_their_own_principal_threshold(hot_state: HotState, clock: FakeClock) -> None:
    key = key_principal("tgk_abc")
    lockout = Lockout(hot_state, clock)
    for i in range(4):
        for _ in range(5):
            await fail(lockout, f"203.0.113.{i}", principal=key, cause="bad signature")
    assert await lockout.locked(key, 1, "198.51.100.1") == Lock("principal", clock.now_us + 30 * S)
    assert await lockout.locked(ALICE, 1, "198.51.100.1") is None


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == name]


async def test_every_failure_lock_and_unlock_is_logged_with_its_cause(
    hot_state: HotState, clock: FakeClock
) -> None:
    lockout = Lockout(hot_state, clock)
    with capture_logs() as logs:
        for _ in range(6):
            lock = await lockout.locked(ALICE, 1, "203.0.113.7")
            await lockout.record_failure(
                ALICE, 1, "203.0.113.7", "wrong password", lock=lock, user_id="usr_alice"
            )
        await lockout.record_failure(
            ALICE, 1, "203.0.113.8", "locked (principal)", count=False, user_id="usr_alice"
        )
        await lockout.record_source_failure("203.0.113.9", "unknown, expired or spent mfa token")
        await lockout.unlock_principal(ALICE, cause="operator unlock")
    failures = events(logs, "auth.failure")
    assert len(failures) == 8
    assert all(line["log_level"] == "warning" and line["cause"] for line in failures)
    assert [line["counted"] for line in failures] == [True] * 5 + [False, False, True]
    assert failures[0]["user_id"] == "usr_alice" and failures[0]["source"] == "203.0.113.7"
    assert failures[0]["pair_failures"] == 1 and failures[4]["pair_failures"] == 5
    assert failures[5]["locked"] == "pair"  # the 6th: refused by the pair lock, not counted
    locks = events(logs, "auth.locked")
    assert len(locks) == 1
    assert locks[0]["kind"] == "pair" and locks[0]["failures"] == 5 and locks[0]["cause"] == "wrong password"
    assert locks[0]["until_us"] == clock.now_us + 30 * S
    unlocks = events(logs, "auth.unlocked")
    assert unlocks == [
        {
            "event": "auth.unlocked",
            "logger": "auth.lockout",
            "log_level": "info",
            "subject": ALICE,
            "cause": "operator unlock",
        }
    ]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.ip_addresses().map(str)))
def test_source_key_never_crashes(text: str) -> None:
    key = source_key(text)
    if key.endswith("/64"):
        assert ipaddress.IPv6Network(key).prefixlen == 64  # strict: the host bits are cleared
    elif key != "unknown":
        assert str(ipaddress.IPv4Address(key)) == key
