"""Fixtures and builders for the rate-limit tests: both counter backends, a fake clock.

- `clock`: a `FakeClock` (µs since the epoch); the in-process counters read it when `now_us` is None. Tests that
  must give both backends the same answers pass `now_us=clock()` explicitly (Redis otherwise reads its own TIME).
- `counters_backend` (parametrised "memory", "redis"): one test's counters: in process (one `MemoryCounters`
  shared by every `open()`), or a `RedisCounters` per `open()` (a replica each) on the machine's Redis at
  127.0.0.1:6379. `subject()` makes subjects unique to the test (Redis keys under them are deleted after it).
- `counters`: `counters_backend.open()`; `subject`: one unique subject.
- Builders: `limit(count, window_s, ...)`, `charge(limit, units)`, `evaluation(subject, *charges)`.

Redis keys expire on Redis's real clock after (buckets + 1) * bucket: a test that moves a fake clock uses windows
far longer than it could take to run, so that no key expires under it on a loaded machine.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence

import pytest

from services.ratelimit.counters import KEY_PREFIX, Counters
from services.ratelimit.counters_memory import MemoryCounters
from services.ratelimit.counters_redis import RedisCounters
from services.ratelimit.model import DEFAULT_BUCKETS, Charge, Counted, Evaluation, Limit, StoreUnavailable
from tradeguard.storage.redis import RedisConfig, client
from tradeguard.testing import FakeClock

LOCAL_REDIS = "redis://127.0.0.1:6379?timeout=5&client_name=tg-test-ratelimit"
SECOND_US = 1_000_000
HOUR_US = 3600 * SECOND_US
DAY_US = 86_400 * SECOND_US


def limit(
    count: int,
    window_s: float = 3600,
    *,
    name: str = "per-hour",
    group: str = "requests",
    buckets: int = DEFAULT_BUCKETS,
    shadow: bool = False,
    consume_refused: bool = False,
    fail_open: bool = False,
) -> Limit:
    """A limit of `count` units per `window_s` seconds (default an hour) in `buckets` buckets."""
    return Limit(
        name=name,
        group=group,
        count=count,
        window_us=round(window_s * SECOND_US),
        buckets=buckets,
        shadow=shadow,
        fail_open=fail_open,
        consume_refused=consume_refused,
    )


def charge(of: Limit, units: int = 1) -> Charge:
    return Charge(of, units)


def evaluation(subject: str, *charges: Charge | Limit, consume: bool = True) -> Evaluation:
    """An evaluation of `charges` (a bare `Limit` is a charge of one unit)."""
    return Evaluation(
        subject, tuple(c if isinstance(c, Charge) else Charge(c, 1) for c in charges), consume=consume
    )


def counted(result: Counted | StoreUnavailable) -> Counted:
    """The `Counted` of a result (fails the test on a `StoreUnavailable`)."""
    assert isinstance(result, Counted), f"the store could not evaluate: {result!r}"
    return result


async def one(
    counters: Counters, subject: str, *charges: Charge | Limit, now_us: int | None, consume: bool = True
) -> Counted:
    """Evaluate one request (a batch of one) and return its `Counted`."""
    (result,) = await counters.evaluate([evaluation(subject, *charges, consume=consume)], now_us)
    return counted(result)


async def delete_keys(url: str, patterns: Sequence[str]) -> None:
    """Delete every key matching `patterns` on the Redis at `url` (test clean-up)."""
    redis_client = client(RedisConfig.from_url(url))  # standalone or cluster (SCAN then visits every primary)
    try:
        for pattern in patterns:
            names = [k async for k in redis_client.scan_iter(match=pattern, count=1000)]
            if names:
                await redis_client.delete(*names)
    finally:
        await redis_client.aclose()


class CountersBackend:
    """One test's counters (see the module). `subject()` gives subjects under this test's own prefix."""

    def __init__(self, kind: str, clock: FakeClock, url: str = LOCAL_REDIS) -> None:
        self.kind = kind
        self.clock = clock
        self.url = url
        self.prefix = f"t-{secrets.token_hex(6)}"
        self._memory: MemoryCounters | None = None
        self._open: list[Counters] = []

    def subject(self, name: str = "s") -> str:
        """A subject no other test uses (SUBJECT_PATTERN)."""
        return f"{self.prefix}:{name}"

    async def open(self) -> Counters:
        if self.kind == "memory":
            if self._memory is None:
                self._memory = MemoryCounters(self.clock)
                self._open.append(self._memory)
            return self._memory
        counters = await RedisCounters.open(RedisConfig.from_url(self.url))
        self._open.append(counters)
        return counters

    async def aclose(self) -> None:
        for counters in self._open:
            await counters.close()
        if self.kind != "memory":
            await delete_keys(self.url, [f"{KEY_PREFIX}{{{self.prefix}:*"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def counters_backend(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[CountersBackend]:
    backend = CountersBackend(request.param, clock)
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
async def counters(counters_backend: CountersBackend) -> Counters:
    return await counters_backend.open()


@pytest.fixture
def subject(counters_backend: CountersBackend) -> str:
    return counters_backend.subject()
