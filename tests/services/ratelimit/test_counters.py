"""The counters' contract (counters.py, model.py) on both backends: the same cases give the same answers given
the same `now_us`. `TestContract` runs on the in-process counters and on the machine's Redis here, and on a real
Redis Cluster in test_counters_cluster.py (which overrides `counters_backend`).

Then what only Redis has: the key layout (one hash slot per subject), Redis's own clock when `now_us` is None,
NOSCRIPT after SCRIPT FLUSH, key expiry (a TTL set when a newer bucket starts, kept otherwise), the packed value
staying small (and holding a bucket written by a clock that stepped back), the commands an evaluation costs (one
GET per counter, a write only of what changed), a failed evaluation in its place, Redis stopped mid-run
(StoreUnavailable promptly, never a hang) and back (served again by the same `RedisCounters`), and the password
never shown.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from services.ratelimit.counters import Counters, counter_key
from services.ratelimit.counters_memory import MemoryCounters
from services.ratelimit.counters_redis import EVALUATE, SCRIPT_BATCH, RedisCounters
from services.ratelimit.model import Counted, Evaluation, StoreUnavailable
from tests.services.ratelimit.conftest import (
    DAY_US,
    HOUR_US,
    LOCAL_REDIS,
    CountersBackend,
    charge,
    counted,
    evaluation,
    limit,
    one,
)
from tests.support import RedisServer, free_port, start_redis
from tradeguard.storage.redis import RedisConfig, RedisUnavailable
from tradeguard.testing import FakeClock, eventually

HANG_S = 30  # a hang detector only: every wait below ends long before on any machine, loaded or not

PER_HOUR = limit(3, 3600, name="per-hour", buckets=4)  # buckets of 15 minutes
PER_DAY = limit(10, 86_400, name="per-day", buckets=24)  # buckets of an hour


class TestContract:
    """What every backend answers, in the same words."""

    async def test_consumes_until_the_limit_then_refuses_saying_when_to_retry(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        t0 = clock()
        for n in (1, 2, 3):
            r = await one(counters, subject, PER_HOUR, now_us=t0 + n)
            assert r.allowed and r.consumed and r.now_us == t0 + n
            assert r.counts[0].counted == n and r.counts[0].fits
        refused = await one(counters, subject, PER_HOUR, now_us=t0 + 4)
        assert not refused.allowed and not refused.consumed
        (c,) = refused.counts
        bucket = PER_HOUR.bucket_us
        first_bucket_ends = (t0 // bucket + PER_HOUR.buckets + 1) * bucket
        assert (c.counted, c.fits, c.reset_us, c.retry_us) == (3, False, first_bucket_ends, first_bucket_ends)
        assert not (await one(counters, subject, PER_HOUR, now_us=first_bucket_ends - 1)).allowed
        again = await one(counters, subject, PER_HOUR, now_us=first_bucket_ends)
        assert again.allowed and again.counts[0].counted == 1  # the three old units left together

    async def test_a_peek_consumes_nothing(self, counters: Counters, subject: str, clock: FakeClock) -> None:
        t = clock()
        peeked = await one(counters, subject, PER_HOUR, now_us=t, consume=False)
        assert peeked.allowed and not peeked.consumed
        assert peeked.counts[0].counted == 0 and peeked.counts[0].reset_us is None
        assert peeked.counts[0].retry_us == t
        await one(counters, subject, charge(PER_HOUR, 2), now_us=t)
        for _ in range(3):
            r = await one(counters, subject, charge(PER_HOUR, 2), now_us=t + 1, consume=False)
            assert not r.allowed and not r.consumed and r.counts[0].counted == 2 and not r.counts[0].fits
        assert (await one(counters, subject, PER_HOUR, now_us=t + 2)).counts[0].counted == 3

    async def test_all_or_nothing_across_limits(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        t = clock()
        tight = limit(2, 3600, name="tight", buckets=4)
        loose = limit(100, 86_400, name="loose", buckets=24)
        other_group = limit(100, 3600, name="tight", group="orders", buckets=4)
        for i in range(2):
            assert (await one(counters, subject, tight, loose, other_group, now_us=t + i)).allowed
        refused = await one(counters, subject, tight, loose, other_group, now_us=t + 2)
        assert not refused.allowed
        assert [c.counted for c in refused.counts] == [2, 2, 2]  # nothing of the refused request was added
        assert [c.fits for c in refused.counts] == [False, True, True]
        assert refused.counts[1].retry_us == t + 2  # the loose limit alone would have let it through

    async def test_shadow_limits_count_but_never_refuse(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        t = clock()
        trial = limit(1, 3600, name="trial", buckets=4, shadow=True)
        for i in range(4):
            r = await one(counters, subject, PER_DAY, trial, now_us=t + i)
            assert r.allowed and r.consumed
            assert r.counts[1].counted == i + 1 and r.counts[1].fits == (i == 0)
        # refused by the enforcing limit: the shadow limit is not charged either
        full = await one(counters, subject, charge(PER_DAY, 7), charge(trial, 1), now_us=t + 5)
        assert not full.allowed and full.counts[1].counted == 4

    async def test_consume_refused_limits_count_refused_requests(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        t = clock()
        strict = limit(2, 3600, name="strict", buckets=4, consume_refused=True)
        assert (await one(counters, subject, strict, PER_DAY, now_us=t)).allowed
        assert (await one(counters, subject, strict, PER_DAY, now_us=t + 1)).allowed
        for i in range(3):
            r = await one(counters, subject, strict, PER_DAY, now_us=t + 2 + i)
            assert not r.allowed and not r.consumed
            assert [c.counted for c in r.counts] == [3 + i, 2]  # strict counts the refusal, per-day does not
        # a peek never consumes, consume_refused or not
        r = await one(counters, subject, strict, now_us=t + 9, consume=False)
        assert r.counts[0].counted == 5

    async def test_weights_count_as_units(self, counters: Counters, subject: str, clock: FakeClock) -> None:
        t = clock()
        assert (await one(counters, subject, charge(PER_DAY, 7), now_us=t)).counts[0].counted == 7
        r = await one(counters, subject, charge(PER_DAY, 4), now_us=t + 1)
        assert not r.allowed and r.counts[0].counted == 7
        assert (await one(counters, subject, charge(PER_DAY, 3), now_us=t + 2)).counts[0].counted == 10

    async def test_a_charge_larger_than_its_limit_never_fits(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        r = await one(counters, subject, charge(PER_HOUR, 4), now_us=clock())
        assert not r.allowed and r.counts[0].retry_us is None and r.counts[0].reset_us is None

    async def test_the_window_slides_bucket_by_bucket(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        hour = limit(4, 3600, name="slide", buckets=4)
        quarter = hour.bucket_us
        start = (clock() // quarter + 1) * quarter  # the start of a bucket
        for i in range(4):  # one unit in each of four successive quarters
            assert (await one(counters, subject, hour, now_us=start + i * quarter)).allowed
        assert not (await one(counters, subject, hour, now_us=start + 4 * quarter - 1)).allowed
        # bucket 0 counts until bucket 5 starts (the window plus up to one bucket): refused through bucket 4
        r = await one(counters, subject, hour, now_us=start + 4 * quarter)
        assert not r.allowed and r.counts[0].retry_us == start + 5 * quarter
        r = await one(counters, subject, hour, now_us=start + 5 * quarter)
        assert r.allowed and r.counts[0].counted == 4  # 3 older ones and this one
        assert r.counts[0].reset_us == start + 6 * quarter

    async def test_a_burst_limit_and_a_daily_quota_on_one_key_both_hold(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        # per-minute here: Redis expires keys on its real clock, so a test's windows outlast the test (module doc)
        burst = limit(3, 60, name="per-minute", buckets=6)
        quota = limit(7, 86_400, name="per-day", buckets=24)
        t = clock()
        allowed = 0
        for second in range(0, 600, 5):  # a request every 5 s for 10 minutes
            r = await one(counters, subject, burst, quota, now_us=t + second * 1_000_000)
            allowed += r.allowed
            if not r.allowed:
                assert not r.counts[0].fits or not r.counts[1].fits
        assert allowed == 7  # three in the first minute, three in the next, one more: the day's quota
        r = await one(counters, subject, burst, quota, now_us=t + DAY_US + HOUR_US)
        assert r.allowed  # a day (and one bucket) later

    async def test_several_charges_on_one_counter_share_it(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        """Limits with one `counter_id` (same window and precision; counts and flags may differ) count on one
        counter: each charge is decided on what it held before the request, and each adds its own units."""
        t = clock()
        loose = limit(5, 3600, name="shared", buckets=4)
        strict = limit(3, 3600, name="shared", buckets=4, consume_refused=True)
        ends = (
            t // loose.bucket_us + loose.buckets + 1
        ) * loose.bucket_us  # when bucket t's units stop counting
        r = await one(counters, subject, charge(loose, 2), charge(strict, 2), now_us=t)
        assert r.allowed
        # strict's retry sees both charges' units (4 + 2 > 3): only when bucket t leaves
        assert [(c.counted, c.fits, c.reset_us, c.retry_us) for c in r.counts] == [
            (2, True, ends, t),
            (2, True, ends, ends),
        ]
        r = await one(counters, subject, charge(loose, 2), charge(strict, 2), now_us=t + 1)
        assert not r.allowed  # 4 + 2 fits neither; strict counts the refusal
        assert [(c.counted, c.fits, c.retry_us) for c in r.counts] == [(4, False, ends), (6, False, ends)]
        peek = await one(counters, subject, charge(loose, 1), now_us=t + 2, consume=False)
        assert peek.counts[0].counted == 6

    async def test_a_batch_is_evaluated_in_order_each_evaluation_atomic(
        self, counters: Counters, counters_backend: CountersBackend, clock: FakeClock
    ) -> None:
        a, b = counters_backend.subject("a"), counters_backend.subject("b")
        two = limit(2, 3600, name="two", buckets=4)
        t = clock()
        batch = [evaluation(a, two), evaluation(b, charge(two, 2)), evaluation(a, two), evaluation(a, two)]
        results = [counted(r) for r in await counters.evaluate(batch, t)]
        assert [r.allowed for r in results] == [True, True, True, False]
        assert [r.counts[0].counted for r in results] == [1, 2, 2, 2]
        assert {r.now_us for r in results} == {t}
        assert await counters.evaluate([], t) == []

    async def test_an_evaluation_without_charges_is_allowed(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        (r,) = await counters.evaluate([Evaluation(subject, ())], clock())
        assert counted(r) == Counted(allowed=True, consumed=True, counts=(), now_us=clock())

    async def test_reset_forgets_a_subject_and_says_how_many_counters_held_units(
        self, counters: Counters, counters_backend: CountersBackend, clock: FakeClock
    ) -> None:
        subject, other = counters_backend.subject("a"), counters_backend.subject("b")
        t = clock()
        await one(counters, subject, PER_HOUR, PER_DAY, now_us=t)
        await one(counters, other, PER_HOUR, now_us=t)
        never_used = limit(5, 60, name="never")
        assert await counters.reset(subject, [PER_HOUR, PER_DAY, never_used]) == 2
        r = await one(counters, subject, PER_HOUR, PER_DAY, now_us=t + 1, consume=False)
        assert [c.counted for c in r.counts] == [0, 0]
        assert (await one(counters, other, PER_HOUR, now_us=t + 1, consume=False)).counts[0].counted == 1
        assert await counters.reset(subject, [PER_HOUR]) == 0
        assert await counters.reset(subject, []) == 0

    async def test_changing_a_limits_window_or_precision_starts_new_counters(
        self, counters: Counters, subject: str, clock: FakeClock
    ) -> None:
        t = clock()
        await one(counters, subject, charge(PER_HOUR, 3), now_us=t)
        raised = limit(5, 3600, name="per-hour", buckets=4)  # same counter: only the count changed
        assert (await one(counters, subject, raised, now_us=t + 1)).counts[0].counted == 4
        finer = limit(3, 3600, name="per-hour", buckets=12)  # another counter
        assert (await one(counters, subject, finer, now_us=t + 2)).counts[0].counted == 1

    async def test_the_store_is_healthy(self, counters: Counters) -> None:
        assert await counters.healthy()

    @pytest.mark.parametrize("seed", [1, 2, 3])
    async def test_a_random_run_gives_the_in_process_answers(
        self, counters: Counters, counters_backend: CountersBackend, clock: FakeClock, seed: int
    ) -> None:
        """The same random traffic (several subjects, limits with every flag, two limits on one counter, peeks,
        batches, a clock that now and then steps back, a little or by more than a window) against this backend and
        a reference `MemoryCounters`: every answer equal."""
        rnd = random.Random(seed)
        reference = MemoryCounters(clock)
        limits = [
            limit(4, 3600, name="a", buckets=4),
            limit(12, 7200, name="b", buckets=3, consume_refused=True),
            limit(2, 1800, name="c", buckets=7, shadow=True),
            limit(30, 86_400, name="d", buckets=24, group="orders"),
            limit(6, 3599, name="e", buckets=5),  # a bucket that does not divide the window
            limit(9, 3600, name="a", buckets=4, consume_refused=True),  # a's counter, other count and flag
        ]
        subjects = [counters_backend.subject(f"r{i}") for i in range(3)]
        t = clock()
        steps = {1: 0, 2: 1, 3: 7, 4: 60, 5: 600, 6: 900, 7: 1799, 8: 3600, 9: 9000}
        for _ in range(150):
            t += steps[rnd.randint(1, 9)] * 1_000_000 + rnd.choice([0, 1, 999_999])
            if rnd.random() < 0.05:  # a replica whose clock is a little behind, or one far behind
                t -= rnd.choice([rnd.randint(1, 120) * 1_000_000, 3 * HOUR_US])
            batch = [
                evaluation(
                    rnd.choice(subjects),
                    *(charge(c, rnd.randint(1, 3)) for c in rnd.sample(limits, rnd.randint(1, 4))),
                    consume=rnd.random() < 0.85,
                )
                for _ in range(rnd.randint(1, 4))
            ]
            assert await counters.evaluate(batch, t) == await reference.evaluate(batch, t)
        for s in subjects:
            assert await counters.reset(s, limits) == await reference.reset(s, limits)


# --- Redis only ---------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_counters(clock: FakeClock) -> AsyncIterator[tuple[RedisCounters, CountersBackend]]:
    backend = CountersBackend("redis", clock)
    counters = await backend.open()
    assert isinstance(counters, RedisCounters)
    try:
        yield counters, backend
    finally:
        await backend.aclose()


async def raw(url: str = LOCAL_REDIS, *, decode: bool = True) -> aioredis.Redis:
    return aioredis.Redis.from_url(url.split("?", 1)[0], decode_responses=decode)


def unpack_counter(value: object) -> tuple[list[tuple[int, int]], int]:
    """A counter's value (counters_redis.py): its (bucket index, units) pairs, and the total it records."""
    assert isinstance(value, bytes) and len(value) >= 24 and (len(value) - 8) % 16 == 0, value
    *flat, total = struct.unpack(f"<{(len(value) - 8) // 8 + 1}d", value)
    assert all(x == int(x) for x in (*flat, total))
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)], int(total)


async def test_a_subjects_keys_share_one_hash_slot_and_are_named_by_the_limit(
    redis_counters: tuple[RedisCounters, CountersBackend], clock: FakeClock
) -> None:
    counters, backend = redis_counters
    subject = backend.subject("key:tgk_ABC.def@x/y")
    limits = [PER_HOUR, PER_DAY, limit(5, 60, name="per-minute", group="orders", buckets=6)]
    await one(counters, subject, *limits, now_us=clock())
    names = [counter_key(subject, x) for x in limits]
    assert names[0] == f"tg:rl:{{{subject}}}:requests/per-hour/{3600 * 10**6}/4"
    assert len({key_slot(n.encode()) for n in names}) == 1
    r = await raw()
    try:
        assert sorted(await r.keys(f"tg:rl:{{{backend.prefix}:*")) == sorted(names)
        assert [await r.type(n) for n in names] == ["string"] * len(names)
    finally:
        await r.aclose()


async def test_a_peek_on_a_new_subject_writes_nothing(
    redis_counters: tuple[RedisCounters, CountersBackend], clock: FakeClock
) -> None:
    counters, backend = redis_counters
    subject = backend.subject()
    await one(counters, subject, PER_HOUR, PER_DAY, now_us=clock(), consume=False)
    await one(counters, subject, charge(PER_HOUR, 9), now_us=clock())  # refused: nothing to add either
    r = await raw()
    try:
        assert await r.exists(counter_key(subject, PER_HOUR), counter_key(subject, PER_DAY)) == 0
    finally:
        await r.aclose()


async def test_without_now_redis_own_clock_counts_for_every_replica(
    redis_counters: tuple[RedisCounters, CountersBackend],
) -> None:
    first, backend = redis_counters
    second = await backend.open()  # another client: another replica of the service
    subject = backend.subject()
    r = await raw()
    try:
        seconds, micros = await r.time()
        before = seconds * 1_000_000 + micros
        a = await one(first, subject, PER_DAY, now_us=None)
        b = await one(second, subject, PER_DAY, now_us=None)
        seconds, micros = await r.time()
        after = seconds * 1_000_000 + micros
    finally:
        await r.aclose()
    assert before <= a.now_us <= b.now_us <= after  # Redis's TIME, read inside the script
    assert (a.counts[0].counted, b.counts[0].counted) == (1, 2)
    day_bucket = PER_DAY.bucket_us
    assert b.counts[0].reset_us == (a.now_us // day_bucket + PER_DAY.buckets + 1) * day_bucket


async def test_keys_expire_once_no_unit_can_count_any_more(
    redis_counters: tuple[RedisCounters, CountersBackend], clock: FakeClock
) -> None:
    counters, backend = redis_counters
    subject = backend.subject()
    t = clock()
    await one(counters, subject, PER_HOUR, PER_DAY, now_us=t)
    r = await raw()
    try:
        for x in (PER_HOUR, PER_DAY):
            ttl_ms = await r.pttl(counter_key(subject, x))
            longest_ms = (x.buckets + 1) * x.bucket_us // 1000  # a unit counts at most (n + 1) buckets
            assert 0 < ttl_ms <= longest_ms
            assert ttl_ms > x.window_us // 1000  # never before the window has passed
        # Units added to the newest bucket keep the TTL (it covers them already); a newer bucket sets it afresh.
        key = counter_key(subject, PER_HOUR)
        short_ms = 60_000  # below anything the script sets, so that a TTL set again shows
        await r.pexpire(key, short_ms)
        await one(counters, subject, PER_HOUR, now_us=t + 1)
        assert 0 < await r.pttl(key) <= short_ms
        await one(counters, subject, PER_HOUR, now_us=t + PER_HOUR.bucket_us)
        assert await r.pttl(key) > PER_HOUR.window_us // 1000
    finally:
        await r.aclose()


async def test_the_value_stays_small_however_many_buckets_pass(
    redis_counters: tuple[RedisCounters, CountersBackend], clock: FakeClock
) -> None:
    counters, backend = redis_counters
    subject = backend.subject()
    fine = limit(10**6, 3600, name="fine", buckets=10)
    g, n = fine.bucket_us, fine.buckets
    key = counter_key(subject, fine)
    r = await raw(decode=False)
    try:
        t = clock()
        sizes = []
        for i in range(300):  # a unit in every bucket, then some, for 30 windows
            now = t + i * g + (i % 3)
            await one(counters, subject, fine, now_us=now)
            pairs, total = unpack_counter(await r.get(key))
            j = now // g
            assert pairs == [
                (k, 1) for k in range(max(j - n, t // g), j + 1)
            ]  # the counted buckets, oldest first
            assert total == len(pairs)
            sizes.append(len(pairs))
        assert max(sizes) == sizes[-1] == n + 1  # j - n .. j, nothing else: 16 bytes a bucket and 8
        assert len(await r.get(key) or b"") == 16 * (n + 1) + 8
        # a clock behind by a few windows writes its bucket in its place (one more, until time passes it)
        newest = (t + 299 * g) // g
        behind = t + 299 * g - 3 * fine.window_us
        await one(counters, subject, fine, now_us=behind)
        pairs, total = unpack_counter(await r.get(key))
        assert pairs == [(behind // g, 1)] + [(k, 1) for k in range(newest - n, newest + 1)]
        assert total == n + 2
        # far ahead: every stale bucket goes at once
        t += 1000 * g
        await one(counters, subject, fine, now_us=t)
        assert unpack_counter(await r.get(key)) == ([(t // g, 1)], 1)
        # a peek after the window emptied prunes the last bucket: the key goes (it held nothing)
        await one(counters, subject, fine, now_us=t + 2 * fine.window_us, consume=False)
        assert await r.exists(key) == 0
    finally:
        await r.aclose()


async def test_an_evaluation_the_store_cannot_run_is_unavailable_in_its_place(
    redis_counters: tuple[RedisCounters, CountersBackend], clock: FakeClock
) -> None:
    counters, backend = redis_counters
    good, hashed, garbled = backend.subject("good"), backend.subject("hashed"), backend.subject("garbled")
    r = await raw()
    try:
        await r.hset(counter_key(hashed, PER_HOUR), "1", "1")
        await r.set(counter_key(garbled, PER_HOUR), "not a counter")
    finally:
        await r.aclose()
    batch = [evaluation(s, PER_HOUR) for s in (good, hashed, garbled)]
    results = await counters.evaluate(batch, clock())
    assert counted(results[0]).allowed
    assert isinstance(results[1], StoreUnavailable) and "WRONGTYPE" in str(results[1])
    assert isinstance(results[2], StoreUnavailable) and "holds no counter" in str(results[2])


async def test_misuse_is_refused(redis_counters: tuple[RedisCounters, CountersBackend]) -> None:
    counters, backend = redis_counters
    with pytest.raises(ValueError, match="now_us must be positive"):
        await counters.evaluate([evaluation(backend.subject(), PER_HOUR)], 0)
    await counters.close()
    await counters.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        await counters.evaluate([evaluation(backend.subject(), PER_HOUR)], 1)
    with pytest.raises(RuntimeError, match="closed"):
        await counters.reset(backend.subject(), [PER_HOUR])
    assert not await counters.healthy()


async def test_an_unreachable_redis_is_refused_at_open_with_the_password_masked() -> None:
    port = free_port()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}?timeout=0.2&connect_timeout=0.2"
    with pytest.raises(RedisUnavailable) as refused:
        await RedisCounters.open(RedisConfig.from_url(url))
    assert "s3cret-pw" not in str(refused.value) and ":***@" in str(refused.value)


# --- a Redis server of the test's own: NOSCRIPT, stopped and back ---------------------------------------------


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[list[RedisServer]]:
    """A `redis-server` started by the test (password `s3cret-pw`); a list, as the test may start it again on
    the same port: every server in it is stopped after the test."""
    servers = [start_redis(tmp_path / "redis", "--requirepass", "s3cret-pw")]
    try:
        await eventually(lambda: servers[0].answers(password="s3cret-pw"), within_s=HANG_S)
        yield servers
    finally:
        for server in servers:
            server.stop()


def own_url(server: RedisServer) -> str:
    # small timeouts: how long a failure takes to show, not a guess at how fast Redis answers
    return f"redis://:s3cret-pw@127.0.0.1:{server.port}?timeout=0.2&connect_timeout=0.2"


async def until(attempt: Callable[[], Awaitable[bool]], within_s: float = HANG_S) -> int:
    """Call `attempt` until it returns True (a few ms apart); how many calls it took."""
    calls = 0
    async with asyncio.timeout(within_s):
        while True:
            calls += 1
            if await attempt():
                return calls
            await asyncio.sleep(0.005)


async def test_noscript_after_script_flush_is_recovered(
    own_redis: list[RedisServer], clock: FakeClock
) -> None:
    counters = await RedisCounters.open(RedisConfig.from_url(own_url(own_redis[0])))
    try:
        t = clock()
        assert (await one(counters, "s", PER_HOUR, now_us=t)).allowed
        loads = EVALUATE.loads
        await counters.client.script_flush()
        batch = [evaluation("s", PER_HOUR), evaluation("s", PER_HOUR), evaluation("s", PER_HOUR)]
        results = [counted(r) for r in await counters.evaluate(batch, t + 1)]
        assert [r.counts[0].counted for r in results] == [2, 3, 3]
        assert EVALUATE.loads == loads + 1  # loaded once for the whole round trip
    finally:
        await counters.close()


async def test_an_evaluation_reads_each_counter_once_and_writes_only_what_changed(
    own_redis: list[RedisServer], clock: FakeClock
) -> None:
    """What the script costs Redis, in commands (the server's own counts): one GET per counter; units added to
    the newest bucket, a SETRANGE of its last bytes; a newer bucket appended, a SETRANGE and a PEXPIRE; a peek
    that prunes nothing, no write; a bucket leaving the window, one SET of the whole value."""
    counters = await RedisCounters.open(RedisConfig.from_url(own_url(own_redis[0])))
    hour = limit(10**6, 3600, name="hour", buckets=4)  # buckets of 15 minutes
    day = limit(10**6, 86_400, name="day", buckets=24)  # buckets of an hour

    async def commands(now: int, consume: bool = True) -> dict[str, int]:
        await counters.client.config_resetstat()
        await one(counters, "s", hour, day, now_us=now, consume=consume)
        stats = await counters.client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        return {name: n for name, n in calls.items() if name in _SCRIPT_COMMANDS}

    try:
        t = (clock() // day.bucket_us + 1) * day.bucket_us  # the start of an hour: a bucket of both
        await one(counters, "warm-up", hour, now_us=t)  # the script loaded
        assert await commands(t) == {"evalsha": 1, "get": 2, "set": 2}  # new counters: SET … PX each
        assert await commands(t + 1) == {"evalsha": 1, "get": 2, "setrange": 2}
        assert await commands(t + 2, consume=False) == {"evalsha": 1, "get": 2}
        # a newer 15-minute bucket, the same hour
        assert await commands(t + hour.bucket_us) == {"evalsha": 1, "get": 2, "setrange": 2, "pexpire": 1}
        # 75 minutes on: the first 15-minute bucket is cut (the value written whole); a newer hour appended
        later = t + 5 * hour.bucket_us
        assert await commands(later) == {"evalsha": 1, "get": 2, "set": 1, "setrange": 1, "pexpire": 1}
    finally:
        await counters.close()


_SCRIPT_COMMANDS = {"evalsha", "get", "set", "setrange", "pexpire", "del", "time"}


async def test_a_batch_goes_to_redis_as_one_script_call_per_chunk_in_order(
    own_redis: list[RedisServer], clock: FakeClock
) -> None:
    """A batch is one EVALSHA per SCRIPT_BATCH evaluations (not one per evaluation), and its evaluations still run
    one after another, each seeing what the ones before it counted, and answer in their places."""
    counters = await RedisCounters.open(RedisConfig.from_url(own_url(own_redis[0])))
    per_hour = limit(1000, 3600, name="hour", buckets=4)
    try:
        t = clock()
        await one(counters, "warm-up", per_hour, now_us=t)  # the script loaded
        await counters.client.config_resetstat()
        size = 2 * SCRIPT_BATCH + 22
        batch = [evaluation(f"s{i % 3}", per_hour) for i in range(size)]
        results = [counted(r) for r in await counters.evaluate(batch, t + 1)]
        assert [r.counts[0].counted for r in results] == [i // 3 + 1 for i in range(size)]
        stats = await counters.client.info("commandstats")
        assert int(stats["cmdstat_evalsha"]["calls"]) == 3
    finally:
        await counters.close()


async def test_redis_stopped_mid_run_is_unavailable_promptly_and_served_again_once_back(
    own_redis: list[RedisServer], tmp_path: Path, clock: FakeClock
) -> None:
    server = own_redis[0]
    counters = await RedisCounters.open(RedisConfig.from_url(own_url(server)))
    t = clock()
    batch = [evaluation("key:k1", PER_HOUR), evaluation("user:u1", PER_DAY)]
    try:
        async with asyncio.timeout(HANG_S):  # a hang detector, nothing more
            assert all(counted(r).allowed for r in await counters.evaluate(batch, t))
            server.stop()
            for _ in range(3):  # every call fails (fast: connection refused), none hangs
                with pytest.raises(StoreUnavailable) as failed:
                    await counters.evaluate(batch, t + 1)
                assert "s3cret-pw" not in str(failed.value)
            with pytest.raises(StoreUnavailable):
                await counters.reset("key:k1", [PER_HOUR])
            assert not await counters.healthy()

            own_redis.append(start_redis(tmp_path / "redis", "--requirepass", "s3cret-pw", port=server.port))
            await eventually(lambda: own_redis[-1].answers(password="s3cret-pw"), within_s=HANG_S)

            async def served() -> bool:
                try:
                    results = await counters.evaluate(batch, t + 2)
                except StoreUnavailable:
                    return False
                return all(isinstance(r, Counted) and r.allowed for r in results)

            await until(served)  # the same RedisCounters: it reconnected on its own (and reloaded its script)
            assert await counters.healthy()
            # the restarted server kept nothing (no persistence): the counts start again
            r = await one(counters, "key:k1", PER_HOUR, now_us=t + 3)
            assert r.counts[0].counted == 2
    finally:
        await counters.close()


async def test_redis_stopped_mid_evaluation_never_hangs(
    own_redis: list[RedisServer], clock: FakeClock
) -> None:
    """Many concurrent evaluations in flight while the server stops: each ends (Counted or StoreUnavailable)."""
    server = own_redis[0]
    counters = await RedisCounters.open(RedisConfig.from_url(own_url(server)))
    limits = [limit(10**9, 3600, name=f"l{i}", buckets=60) for i in range(4)]
    outcomes: list[str] = []

    async def hammer(i: int) -> None:
        while True:
            try:
                await counters.evaluate([evaluation(f"s{i}", *limits)], clock())
                outcomes.append("ok")
            except StoreUnavailable:
                outcomes.append("unavailable")
                return

    try:
        async with asyncio.timeout(HANG_S):
            tasks = [asyncio.create_task(hammer(i)) for i in range(16)]
            await eventually(lambda: len(outcomes) >= 50, within_s=HANG_S)
            server.stop()
            await asyncio.gather(*tasks)
        assert outcomes.count("unavailable") == 16
    finally:
        await counters.close()


async def test_a_frozen_redis_times_out_as_unavailable_and_is_served_again_once_it_thaws(
    own_redis: list[RedisServer], clock: FakeClock
) -> None:
    """A server that accepts but never answers (SIGSTOP): the client's timeout (0.2 s here) ends each call."""
    server = own_redis[0]
    counters = await RedisCounters.open(RedisConfig.from_url(own_url(server)))
    batch = [evaluation("key:k1", PER_HOUR)]
    try:
        async with asyncio.timeout(HANG_S):
            assert counted((await counters.evaluate(batch, clock()))[0]).allowed
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(StoreUnavailable, match="Timeout"):
                    await counters.evaluate(batch, clock())
                assert not await counters.healthy()
            finally:
                os.kill(server.process.pid, signal.SIGCONT)

            async def served() -> bool:
                try:
                    return all(isinstance(r, Counted) for r in await counters.evaluate(batch, clock()))
                except StoreUnavailable:
                    return False

            await until(served)
            r = await one(counters, "key:k1", PER_HOUR, now_us=clock(), consume=False)
            assert r.counts[0].counted in (2, 3)  # the timed-out call may have run: all of it or nothing
    finally:
        await counters.close()
