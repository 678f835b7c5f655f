"""The HotState contract (services/auth/hot.py), run in process and on the machine's real Redis (the
`hot_backend` fixture of conftest.py; a second `open()` is a second replica sharing the state), plus a real Redis
Cluster for the nonce claims and the revocation stream: replays refused across replicas, TOTP steps accepted once
and never backwards, exactly one winner of concurrent claims, sliding failure windows, locks that only extend,
challenges taken once, revocations resumed with no gap and no duplicate and waiters woken at once, every Redis key
with a TTL, and the in-process bound under a flood of distinct keys. No sleeps: the fake clock moves time, and
`eventually` waits for a state."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from services.auth.hot import HotState
from services.auth.hot_memory import MemoryHotState
from services.auth.hot_redis import RedisHotState
from services.auth.model import Revocation, RevocationKind
from tests.support import RedisServer, redis_cluster
from tradeguard.testing import FakeClock, eventually

from .conftest import HotBackend

T = TypeVar("T")
SECOND = 1_000_000
MINUTE = 60 * SECOND
NONCE = "n0nce-0123456789abcdef"


async def race(calls: Sequence[Awaitable[T]]) -> list[T]:
    """The calls run concurrently (their coroutines created first, then gathered)."""
    return list(await asyncio.gather(*calls))


def waiting(state: HotState) -> int:
    assert isinstance(state, MemoryHotState | RedisHotState)
    return state.waiting


async def gone(backend: HotBackend, state: HotState, key: str, advance_us: int) -> None:
    """Let an entry's time to live pass: the fake clock for the in-process state; for Redis (whose TTLs run in
    real time) wait until Redis has dropped the key."""
    if backend.kind == "memory":
        backend.clock.advance(advance_us)
        return
    assert isinstance(state, RedisHotState)
    with redis.Redis(host="127.0.0.1", port=6379) as sync:
        await eventually(lambda: not sync.exists(key), within_s=5)


# --- nonces --------------------------------------------------------------------------------------------------


async def test_a_replayed_nonce_is_refused_also_by_a_second_replica(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    assert await first.claim_nonce("tgk_a", NONCE, 5 * SECOND)
    assert not await first.claim_nonce("tgk_a", NONCE, 5 * SECOND)
    assert not await second.claim_nonce("tgk_a", NONCE, 5 * SECOND)  # another replica sharing the state
    assert await second.claim_nonce("tgk_b", NONCE, 5 * SECOND)  # nonces are per key
    assert await second.claim_nonce("tgk_a", NONCE + "x", 5 * SECOND)
    hot_backend.clock.advance(4 * SECOND)
    assert not await first.claim_nonce("tgk_a", NONCE, 5 * SECOND)  # still within its time to live


async def test_a_nonce_may_be_claimed_again_after_its_time_to_live(hot_backend: HotBackend) -> None:
    state = await hot_backend.open()
    ttl = 40_000  # 40 ms: Redis's own TTL runs in real time
    assert await state.claim_nonce("tgk_a", NONCE, ttl)
    key = state.nonce_key("tgk_a", NONCE) if isinstance(state, RedisHotState) else ""
    await gone(hot_backend, state, key, ttl)
    assert await state.claim_nonce("tgk_a", NONCE, 5 * SECOND)


async def test_concurrent_nonce_claims_on_two_replicas_have_exactly_one_winner(
    hot_backend: HotBackend,
) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    calls = [s.claim_nonce("tgk_a", NONCE, 5 * SECOND) for s in (first, second) * 50]
    assert (await race(calls)).count(True) == 1


async def test_times_to_live_must_be_positive(hot_state: HotState) -> None:
    for call in (
        lambda: hot_state.claim_nonce("k", NONCE, 0),
        lambda: hot_state.advance_totp_step("u", 1, -1),
        lambda: hot_state.count_failure("ip:1", 0),
        lambda: hot_state.put_challenge("c", "u", 0),
    ):
        with pytest.raises(ValueError, match="positive"):
            await call()


# --- TOTP steps ----------------------------------------------------------------------------------------------


async def test_a_totp_step_is_accepted_once_and_never_an_older_one_after_a_newer(
    hot_backend: HotBackend,
) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    ttl = 2 * MINUTE
    assert await first.advance_totp_step("u-1", 1000, ttl)
    assert not await first.advance_totp_step("u-1", 1000, ttl)  # the same code twice
    assert not await second.advance_totp_step("u-1", 1000, ttl)  # ... also on another replica
    assert not await second.advance_totp_step("u-1", 999, ttl)  # an older code after a newer
    assert await second.advance_totp_step("u-1", 1001, ttl)
    assert not await first.advance_totp_step("u-1", 1000, ttl)
    assert not await first.advance_totp_step("u-1", 1001, ttl)
    assert await first.advance_totp_step("u-2", 5, ttl)  # per user


async def test_concurrent_totp_submissions_of_one_code_have_exactly_one_winner(
    hot_backend: HotBackend,
) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    calls = [s.advance_totp_step("u-1", 57_000_000, MINUTE) for s in (first, second) * 25]
    assert (await race(calls)).count(True) == 1
    # Mixed steps at once: whatever the order, the last accepted step is the greatest, and it was accepted once.
    steps = [57_000_001, 57_000_003, 57_000_002] * 10
    mixed = [s.advance_totp_step("u-1", step, MINUTE) for s in (first, second) for step in steps]
    results = await race(mixed)
    accepted = [step for step, ok in zip(steps * 2, results, strict=True) if ok]
    assert len(accepted) == len(set(accepted)) and max(accepted) == 57_000_003  # each step at most once
    assert not await first.advance_totp_step("u-1", 57_000_003, MINUTE)


# --- failures and locks --------------------------------------------------------------------------------------


async def test_failures_are_counted_in_a_sliding_window(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    clock, window = hot_backend.clock, MINUTE
    assert await first.count_failure("pair:acct-1|10.0.0.1", window) == 1
    clock.advance_s(20)
    assert await second.count_failure("pair:acct-1|10.0.0.1", window) == 2  # shared by the replicas
    clock.advance_s(20)
    assert await first.count_failure("pair:acct-1|10.0.0.1", window) == 3
    assert await first.count_failure("account:acct-1", window) == 1  # per subject
    clock.advance_s(20)  # the first failure is now exactly one window old: out
    assert await first.count_failure("pair:acct-1|10.0.0.1", window) == 3
    clock.advance_s(61)  # all of them out
    assert await second.count_failure("pair:acct-1|10.0.0.1", window) == 1
    await second.clear_failures("pair:acct-1|10.0.0.1")
    assert await first.count_failure("pair:acct-1|10.0.0.1", window) == 1
    assert await first.count_failure("account:acct-1", window) == 1  # the other subject's window moved too
    await first.clear_failures("ip:never-failed")  # nothing to clear: no error


async def test_concurrent_failures_are_each_counted(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    calls = [s.count_failure("key:tgk_a", MINUTE) for s in (first, second) * 20]
    assert sorted(await race(calls)) == list(range(1, 41))  # atomic: every count seen exactly once


async def test_a_failure_window_saturates_at_its_cap(hot_backend: HotBackend) -> None:
    state = await hot_backend.open(max_failures_per_subject=5)
    counts = [await state.count_failure("ip:10.0.0.9", MINUTE) for _ in range(12)]
    assert counts == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5]


async def test_a_lock_extends_but_never_shortens(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    now = hot_backend.clock()
    assert await first.locked_until("account:acct-1", now) is None
    await first.lock("account:acct-1", now + MINUTE)
    assert await second.locked_until("account:acct-1", now) == now + MINUTE
    await second.lock("account:acct-1", now + 30 * SECOND)  # earlier: does not shorten it
    assert await first.locked_until("account:acct-1", now) == now + MINUTE
    await second.lock("account:acct-1", now + 5 * MINUTE)  # later: extends it
    assert await first.locked_until("account:acct-1", now) == now + 5 * MINUTE
    assert await first.locked_until("account:acct-1", now + 5 * MINUTE - 1) == now + 5 * MINUTE
    assert await first.locked_until("account:acct-1", now + 5 * MINUTE) is None  # over when it ends
    assert await first.locked_until("account:acct-2", now) is None  # per subject
    await first.unlock("account:acct-1")
    assert await second.locked_until("account:acct-1", now) is None
    await first.lock("account:acct-1", now - 1)  # already over: no lock
    assert await first.locked_until("account:acct-1", now - 10) is None


async def test_concurrent_locks_keep_the_latest_end(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    now = hot_backend.clock()
    ends = [now + i * SECOND for i in range(1, 41)]
    await race([s.lock("ip:10.0.0.1", end) for end in ends for s in (first, second)])
    assert await first.locked_until("ip:10.0.0.1", now) == max(ends)


# --- challenges ----------------------------------------------------------------------------------------------


async def test_a_challenge_is_taken_once(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    await first.put_challenge("c" * 64, "u-1", 5 * MINUTE)
    assert await second.take_challenge("c" * 64) == "u-1"
    assert await first.take_challenge("c" * 64) is None
    assert await second.take_challenge("d" * 64) is None
    await first.put_challenge("e" * 64, "u-2", 5 * MINUTE)
    takes = await race([s.take_challenge("e" * 64) for s in (first, second) * 20])
    assert [t for t in takes if t is not None] == ["u-2"]


async def test_a_challenge_expires(hot_backend: HotBackend) -> None:
    state = await hot_backend.open()
    ttl = 40_000
    await state.put_challenge("f" * 64, "u-1", ttl)
    key = state.challenge_key("f" * 64) if isinstance(state, RedisHotState) else ""
    await gone(hot_backend, state, key, ttl)
    assert await state.take_challenge("f" * 64) is None


# --- revocations ---------------------------------------------------------------------------------------------


async def test_revocations_resume_with_no_gap_and_no_duplicate(hot_backend: HotBackend) -> None:
    first, second = await hot_backend.open(), await hot_backend.open()
    now = hot_backend.clock()
    published: list[Revocation] = []
    for i, kind in enumerate(RevocationKind):
        state = (first, second)[i % 2]  # both replicas publish: one sequence
        published.append(
            await state.publish_revocation(kind, f"value-{i}\nwith|odd:chars", now, now + MINUTE)
        )
    sequences = [r.sequence for r in published]
    assert sequences == list(range(sequences[0], sequences[0] + 4))  # consecutive across replicas
    assert [r.kind for r in published] == list(RevocationKind)
    assert await second.revocations_after(0) == published
    # A guard that saw the second resumes from it: the rest, oldest first, nothing twice, nothing missing.
    assert await first.revocations_after(sequences[1]) == published[2:]
    assert await first.revocations_after(sequences[-1]) == []
    more = await first.publish_revocation(RevocationKind.JTI, "jti-5", now, now + MINUTE)
    assert more.sequence == sequences[-1] + 1
    assert await second.revocations_after(sequences[-1]) == [more]


async def test_expired_revocations_are_no_longer_served(hot_backend: HotBackend) -> None:
    state = await hot_backend.open()
    clock = hot_backend.clock
    now = clock()
    short = await state.publish_revocation(RevocationKind.JTI, "jti-short", now, now + MINUTE)
    long = await state.publish_revocation(RevocationKind.FAMILY, "fam-long", now, now + 60 * MINUTE)
    clock.advance(MINUTE)  # the short one matters until its expiry instant, included
    assert await state.revocations_after(0) == [short, long]
    clock.advance(1)
    assert await state.revocations_after(0) == [long]
    later = await state.publish_revocation(RevocationKind.USER, "u-1", clock(), clock() + MINUTE)
    assert await state.revocations_after(0) == [long, later]
    assert later.sequence == long.sequence + 1  # the expired one's sequence is never reused


async def test_a_waiter_is_woken_at_once_by_a_publication_on_another_replica(hot_backend: HotBackend) -> None:
    publisher, listener = await hot_backend.open(), await hot_backend.open()
    now = hot_backend.clock()
    seen = await publisher.publish_revocation(RevocationKind.KEY, "tgk_old", now, now + MINUTE)
    loop = asyncio.get_running_loop()
    waiters = [asyncio.create_task(listener.revocations_after(seen.sequence, wait_s=30)) for _ in range(5)]
    await eventually(lambda: waiting(listener) == 5)
    started = loop.time()
    revoked = await publisher.publish_revocation(RevocationKind.KEY, "tgk_new", now, now + MINUTE)
    await eventually(lambda: all(w.done() for w in waiters), within_s=5)
    assert loop.time() - started < 1.0  # woken by the publication, far before the 30 s wait ends
    assert [w.result() for w in waiters] == [[revoked]] * 5
    assert waiting(listener) == 0


async def test_a_wait_with_nothing_published_ends_empty(hot_backend: HotBackend) -> None:
    state = await hot_backend.open()
    assert await state.revocations_after(0, wait_s=0.05) == []
    now = hot_backend.clock()
    expired = await state.publish_revocation(RevocationKind.JTI, "j", now - 2 * MINUTE, now - MINUTE)
    # Only an expired one after the sequence: no busy loop, the wait ends empty at its deadline.
    assert await state.revocations_after(expired.sequence - 1, wait_s=0.05) == []


async def test_a_restarted_hot_state_never_reuses_a_sequence(hot_backend: HotBackend) -> None:
    """Sequences start at the clock's microseconds: a guard that saw sequence n of a hot state that lost its state
    (a restarted process, a flushed Redis) still gets every new revocation when it asks for those after n."""
    state = await hot_backend.open()
    now = hot_backend.clock()
    seen = await state.publish_revocation(RevocationKind.JTI, "j1", now, now + MINUTE)
    await state.close()
    if hot_backend.kind == "redis":
        await hot_backend.aclose()  # every key gone
    hot_backend.clock.advance(1)
    restarted = await hot_backend.open(max_failures_per_subject=1000)  # a fresh state (memory: new maps)
    new = await restarted.publish_revocation(RevocationKind.JTI, "j2", now, now + MINUTE)
    assert new.sequence > seen.sequence
    assert await restarted.revocations_after(seen.sequence) == [new]


async def test_a_closed_hot_state_refuses_work_and_ends_its_waits(hot_backend: HotBackend) -> None:
    state = await hot_backend.open()
    waiter = asyncio.create_task(state.revocations_after(0, wait_s=30))
    await eventually(lambda: waiting(state) == 1)
    await state.close()
    with pytest.raises(RuntimeError, match="closed"):
        await waiter
    with pytest.raises(RuntimeError, match="closed"):
        await state.claim_nonce("k", NONCE, SECOND)


# --- Redis: every key has a time to live ----------------------------------------------------------------------


async def test_every_redis_key_has_a_time_to_live(hot_backend: HotBackend) -> None:
    if hot_backend.kind != "redis":
        pytest.skip("the in-process state is bounded by its cap (test_the_memory_bound_*)")
    state = await hot_backend.open()
    now = hot_backend.clock()
    await state.claim_nonce("tgk_a", NONCE, 5 * SECOND)
    await state.advance_totp_step("u-1", 1, MINUTE)
    await state.count_failure("ip:10.0.0.1", MINUTE)
    await state.lock("ip:10.0.0.1", now + MINUTE)
    await state.put_challenge("c" * 64, "u-1", MINUTE)
    await state.publish_revocation(RevocationKind.USER, "u-1", now, now + MINUTE)
    keys = await hot_backend.keys()
    assert len(keys) == 9  # nonce, step, failures, lock, challenge, 4 revocation keys
    with redis.Redis(host="127.0.0.1", port=6379) as sync:
        ttls = {key: sync.pttl(key) for key in keys}
    assert all(0 < ttl <= 61 * 1000 + 1000 for ttl in ttls.values()), ttls
    # One subject's keys share a hash slot (a hash tag), and the revocation keys share one too.
    assert isinstance(state, RedisHotState)
    assert state.failures_key("ip:10.0.0.1").endswith("{ip:10.0.0.1}")
    assert state.lock_key("ip:10.0.0.1").endswith("{ip:10.0.0.1}")
    assert all("{rev}" in key for key in state.revocation_keys)


# --- the in-process bound ------------------------------------------------------------------------------------


async def test_the_memory_bound_holds_under_a_flood_of_distinct_keys(clock: FakeClock) -> None:
    state = MemoryHotState(clock, max_entries=100)
    for i in range(5000):
        assert await state.claim_nonce(f"tgk_{i % 7}", f"nonce-{i:016d}", 5 * SECOND)
        await state.count_failure(f"ip:10.0.{i // 256}.{i % 256}", MINUTE)
        await state.lock(f"ip:10.0.{i // 256}.{i % 256}", clock() + MINUTE)
        await state.put_challenge(f"{i:064d}", "u", MINUTE)
        await state.advance_totp_step(f"u-{i}", 1, MINUTE)
        await state.publish_revocation(RevocationKind.JTI, f"j{i}", clock(), clock() + MINUTE)
    assert all(size <= 100 for size in state.sizes().values()), state.sizes()
    assert state.evictions == 6 * (5000 - 100)
    # The oldest went first: the newest nonce is still refused, the oldest can be claimed again.
    assert not await state.claim_nonce(f"tgk_{4999 % 7}", "nonce-0000000000004999", 5 * SECOND)
    assert await state.claim_nonce("tgk_0", "nonce-0000000000000000", 5 * SECOND)
    assert len(await state.revocations_after(0)) == 100


async def test_the_memory_bound_evicts_expired_entries_before_live_ones(clock: FakeClock) -> None:
    state = MemoryHotState(clock, max_entries=10)
    for i in range(6):
        await state.claim_nonce("tgk_a", f"short-{i:012d}", SECOND)
    clock.advance(10)
    for i in range(4):
        await state.claim_nonce("tgk_a", f"long-{i:013d}", MINUTE)
    clock.advance(SECOND)  # the six short ones have expired
    for i in range(6):
        await state.claim_nonce("tgk_b", f"new-{i:014d}", MINUTE)
    assert state.evictions == 0 and state.sizes()["nonces"] == 10
    for i in range(4):  # the older live ones were kept
        assert not await state.claim_nonce("tgk_a", f"long-{i:013d}", MINUTE)


async def test_memory_writes_sweep_expired_entries_so_a_steady_flow_stays_near_its_live_size(
    clock: FakeClock,
) -> None:
    state = MemoryHotState(clock, max_entries=100_000)
    for i in range(20_000):  # 1,000 nonces a second for 20 s, each remembered 2 s
        assert await state.claim_nonce("tgk_a", f"nonce-{i:016d}", 2 * SECOND)
        clock.advance(SECOND // 1000)
    assert state.sizes()["nonces"] <= 2_100  # about rate x lifetime, far below the bound
    assert state.evictions == 0
    # the live ones are all still refused; an expired one is gone
    for i in range(20_000 - 1_900, 20_000):
        assert not await state.claim_nonce("tgk_a", f"nonce-{i:016d}", 2 * SECOND)
    assert await state.claim_nonce("tgk_a", f"nonce-{0:016d}", 2 * SECOND)


async def test_a_memory_failure_window_never_grows_past_its_cap(clock: FakeClock) -> None:
    state = MemoryHotState(clock, max_failures_per_subject=3)
    counts = []
    for _ in range(10):
        counts.append(await state.count_failure("ip:10.0.0.1", MINUTE))
        clock.advance(1)
    assert counts == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]


# --- a real Redis Cluster ------------------------------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[RedisServer]]:
    async with redis_cluster(tmp_path / "cluster") as servers:
        yield servers


@pytest.mark.slow
async def test_on_a_redis_cluster_nonces_and_the_revocation_stream_work_across_replicas(
    cluster: list[RedisServer], clock: FakeClock
) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    prefix = f"tg-test:auth:{secrets.token_hex(4)}:"
    first = await RedisHotState.open(url, prefix=prefix, clock=clock)
    second = await RedisHotState.open(
        f"redis+cluster://127.0.0.1:{cluster[2].port}", prefix=prefix, clock=clock
    )
    try:
        key_ids = [f"tgk_{i}" for i in range(24)]  # spread over the slots of every node
        assert all([await first.claim_nonce(k, NONCE, MINUTE) for k in key_ids])
        assert not any([await second.claim_nonce(k, NONCE, MINUTE) for k in key_ids])
        calls = [s.claim_nonce("tgk_race", NONCE, MINUTE) for s in (first, second) * 20]
        assert (await race(calls)).count(True) == 1
        # The scripts run on every node: one slot per subject.
        assert await first.advance_totp_step("u-1", 10, MINUTE) and not await second.advance_totp_step(
            "u-1", 10, MINUTE
        )
        assert [await s.count_failure("account:acct-1", MINUTE) for s in (first, second)] == [1, 2]
        await first.lock("account:acct-1", clock() + MINUTE)
        assert await second.locked_until("account:acct-1", clock()) == clock() + MINUTE
        # The revocation stream: published on one replica, a waiter on the other woken at once, no gap.
        now = clock()
        a = await first.publish_revocation(RevocationKind.KEY, "tgk_1", now, now + MINUTE)
        waiter = asyncio.create_task(second.revocations_after(a.sequence, wait_s=30))
        await eventually(lambda: second.waiting == 1)
        b = await first.publish_revocation(RevocationKind.JTI, "jti-1", now, now + MINUTE)
        await eventually(waiter.done, within_s=5)
        assert waiter.result() == [b] and b.sequence == a.sequence + 1
        assert await second.revocations_after(0) == [a, b]
    finally:
        await first.close()
        await second.close()
