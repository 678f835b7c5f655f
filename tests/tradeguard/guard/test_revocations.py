"""RevocationSet (expiry, bound, fail closed) and RevocationWatcher (resume, heartbeats, silence) without a network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support import AuthServices
from tradeguard.guard.auth_client import AuthClient, StreamRefused
from tradeguard.guard.revocations import Kind, RevocationSet, RevocationWatcher, Revoked
from tradeguard.testing import FakeClock, eventually

S = 1_000_000  # one second in microseconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def live(clock: FakeClock, seconds: float = 60) -> int:
    return clock() + round(seconds * S)


def test_each_kind_is_checked_until_it_expires(clock: FakeClock) -> None:
    revocations = RevocationSet(clock)
    now = clock()
    revocations.apply(Revoked(1, Kind.JTI, "j1", 0, live(clock, 10)))
    revocations.apply(Revoked(2, Kind.FAMILY, "f1", now, live(clock)))
    revocations.apply(Revoked(3, Kind.USER, "u1", now, live(clock)))
    revocations.apply(Revoked(4, Kind.KEY, "k1", 0, live(clock)))
    assert revocations.token_revoked("j1", None, "u9", now) == "token revoked"
    assert revocations.token_revoked("j2", "f1", "u9", now) == "token family revoked"
    assert revocations.token_revoked("j2", "f1", "u9", now + 1) is None  # issued after the revocation
    assert revocations.token_revoked("j2", None, "u1", now - S) == "user's tokens revoked"
    assert revocations.token_revoked("j2", None, "u1", now + S) is None
    assert revocations.key_revoked("k1") and not revocations.key_revoked("k2")
    clock.advance_s(11)
    assert revocations.token_revoked("j1", None, "u9", now) is None  # the token itself has expired by now
    assert revocations.last_sequence == 4 and len(revocations) == 4


def test_a_later_user_revocation_covers_an_earlier_one_and_expired_ones_are_not_kept(
    clock: FakeClock,
) -> None:
    revocations = RevocationSet(clock)
    now = clock()
    revocations.apply(Revoked(1, Kind.USER, "u1", now + 5 * S, live(clock)))
    revocations.apply(Revoked(2, Kind.USER, "u1", now, live(clock)))  # older: does not shorten the first
    assert revocations.token_revoked("j", None, "u1", now + 4 * S) is not None
    revocations.apply(Revoked(3, Kind.JTI, "old", 0, clock() - 1))
    assert len(revocations) == 1 and revocations.last_sequence == 3
    revocations.apply(Revoked(4, None))  # a heartbeat moves the sequence only
    assert revocations.last_sequence == 4 and revocations.applied == 2


def test_a_full_set_refuses_every_token_until_the_dropped_revocation_expires(clock: FakeClock) -> None:
    revocations = RevocationSet(clock, max_entries=3)
    revocations.stream_up()
    for i in range(3):
        revocations.apply(Revoked(i + 1, Kind.JTI, f"j{i}", 0, live(clock, 100)))
    assert revocations.unusable() is None
    revocations.apply(
        Revoked(4, Kind.JTI, "dropped", 0, live(clock, 30))
    )  # no room: never forgotten silently
    assert len(revocations) == 3
    assert revocations.unusable() == "revocation set overflowed"
    clock.advance_s(30.001)  # what the dropped revocation revoked has expired
    assert revocations.unusable() is None
    revocations.apply(Revoked(5, Kind.JTI, "room?", 0, live(clock, 200)))
    assert revocations.unusable() == "revocation set overflowed"  # the three are still live: still full
    clock.advance_s(100)  # they expire: pruned to make room
    revocations.apply(Revoked(6, Kind.JTI, "fits", 0, live(clock, 10)))
    assert revocations.token_revoked("fits", None, "u", 0) is not None


def test_the_outage_rule(clock: FakeClock) -> None:
    revocations = RevocationSet(clock, max_outage_s=2.0)
    assert revocations.unusable() == "revocation stream never connected"
    revocations.stream_down()
    assert revocations.unusable() == "revocation stream never connected"
    revocations.stream_up()
    assert revocations.unusable() is None and revocations.is_up
    revocations.stream_down()
    clock.advance_s(1.5)
    revocations.stream_down()  # still the same outage: its start does not move
    clock.advance_s(0.6)
    assert revocations.unusable() == "revocation stream down too long"
    revocations.stream_up()
    assert revocations.unusable() is None
    with pytest.raises(ValueError, match="max_outage_s"):
        RevocationSet(clock, max_outage_s=61)


class Script:
    """A revocation stream played from a script: per open, the items to give, then what happens."""

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.plays: list[tuple[list[Revoked], str]] = []  # (items, "end" | "fail" | "hang")
        self.cancelled = 0

    def open(self, since_sequence: int) -> Call:
        self.opened.append(since_sequence)
        items, then = self.plays.pop(0) if self.plays else ([], "hang")
        return Call(self, items, then)


class Call:
    def __init__(self, script: Script, items: list[Revoked], then: str) -> None:
        self.script, self.items, self.then = script, items, then

    async def ready(self) -> None:
        if self.then == "refuse":
            raise ConnectionError("auth down")

    async def _run(self) -> AsyncIterator[Revoked]:
        for item in self.items:
            yield item
        if self.then == "fail":
            raise ConnectionError("stream broke")
        if self.then == "hang":
            await asyncio.Event().wait()

    def __aiter__(self) -> AsyncIterator[Revoked]:
        return self._run()

    def cancel(self) -> None:
        self.script.cancelled += 1


async def test_the_watcher_resumes_after_the_last_sequence_and_reconnects(clock: FakeClock) -> None:
    revocations = RevocationSet(clock)
    script = Script()
    far = live(clock, 600)
    script.plays = [
        ([Revoked(1, Kind.JTI, "a", 0, far), Revoked(2, Kind.KEY, "k", 0, far)], "fail"),
        ([], "refuse"),
        ([Revoked(2, None), Revoked(3, Kind.JTI, "c", 0, far)], "end"),
        ([Revoked(3, None)], "hang"),
    ]
    watcher = RevocationWatcher(revocations, script, backoff_first_s=0.001, backoff_max_s=0.002)
    task = asyncio.create_task(watcher.run())
    try:
        await eventually(lambda: len(script.opened) == 4 and revocations.is_up)
        assert script.opened == [1, 3, 3, 4]
        assert revocations.token_revoked("c", None, "u", 0) and revocations.key_revoked("k")
        assert watcher.connects == 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert script.cancelled >= 1


async def test_a_silent_stream_is_reopened(clock: FakeClock) -> None:
    revocations = RevocationSet(clock)
    script = Script()
    script.plays = [([], "hang"), ([Revoked(1, Kind.JTI, "a", 0, live(clock))], "hang")]
    watcher = RevocationWatcher(revocations, script, backoff_first_s=0.001, idle_timeout_s=0.05)
    task = asyncio.create_task(watcher.run())
    try:
        await eventually(lambda: revocations.token_revoked("a", None, "u", 0) is not None)
        assert script.opened[:2] == [1, 1]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_refused_stream_never_counts_as_up(auth_services: AuthServices) -> None:
    """A WatchRevocations call the auth service refuses (here: a caller its policy does not list) ends
    `initial_metadata()` too; only the open marker the servicer sends makes the stream count as up, so a guard
    whose stream is refused again and again cannot go on accepting tokens while it learns no revocation."""
    ops = auth_services.channel("ops")
    async with ops:
        refused = AuthClient(ops).open(1)
        with pytest.raises(StreamRefused, match="PERMISSION_DENIED"):
            await refused.ready()
    trading = auth_services.channel("trading")
    async with trading:
        opened = AuthClient(trading).open(1)
        await opened.ready()  # a guard's workload: the stream opens
        opened.cancel()
