"""The rate-limit service, declared once: the kit's runner (tradeguard.service) turns this into a running server.

No database (`stores=NO_DATABASE`): the limits come from a file, the counters live in Redis or in process. What `build`
wires, in order:
- the limits file (`LimitsFile`): loaded now; the service refuses to start (`LimitsUnavailable`, one line naming
  the file, its line and field) when it is missing or invalid; a background task re-reads it when it changes
  (`RELOAD_INTERVAL_S`), keeping the last good limits when an edit is bad;
- the counters: `RedisCounters` when TRADEGUARD_RATELIMIT_REDIS_URL is set (PING answered at start, else it refuses
  to start: `RedisUnavailable`), else `MemoryCounters` (bounded by MAX_COUNTERS); closed by a closer;
- the core (`RateLimiter`, store timeout STORE_TIMEOUT_MS), the servicer (its batcher closed by a closer, before
  the counters) and Envoy's ShouldRateLimit (services/ratelimit/rls.py) on the same server and the same batcher
  (`Assembly.extra_services`);
- the health probe: the counters' `healthy()` (Redis answers PING; the cluster is ok), so the server reports
  NOT_SERVING while the store is down and SERVING again when it is back. Decisions go on meanwhile, each limit's
  fail mode deciding within the store timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

from services.ratelimit import policy, rls
from services.ratelimit.core import RateLimiter
from services.ratelimit.counters import Counters
from services.ratelimit.counters_memory import MemoryCounters
from services.ratelimit.counters_redis import RedisCounters
from services.ratelimit.limits_file import LimitsError
from services.ratelimit.reload import LimitsFile
from services.ratelimit.rls import RlsServicer
from services.ratelimit.servicer import RateLimitServicer
from services.ratelimit.settings import Settings
from tradeguard.mesh.server import Service
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc
from tradeguard.service import NO_DATABASE, Assembly, Closer, Declaration, NoStore, Wiring
from tradeguard.storage import clock_us

__all__ = ["SERVICE", "LimitsUnavailable", "build", "builder", "load_limits", "open_counters"]

SUMMARY: Final = (
    "The rate-limit service: sliding-window quotas per API key and user (tiers, weights, overrides, shadow "
    "limits, fail modes) from a hot-reloaded limits file; Envoy's RLS."
)


class LimitsUnavailable(RuntimeError):
    """The limits file is missing or invalid at start-up: the service does not start."""


def load_limits(settings: Settings, clock: Callable[[], int] = clock_us) -> LimitsFile:
    """The limits file, loaded; `LimitsUnavailable` saying which file and what is wrong with it."""
    path = settings.limits_file
    if not path.exists():
        raise LimitsUnavailable(
            f"no limits file at {path}: `tradeguard up` installs the packaged default there "
            "(services/ratelimit/limits.yaml), or point TRADEGUARD_RATELIMIT_LIMITS_FILE at one"
        )
    try:
        return LimitsFile(path, clock)
    except LimitsError as error:  # "<source>:<line>: <path>: <problem>", or why it cannot be read
        raise LimitsUnavailable(f"the limits file is refused: {error}") from None


async def open_counters(settings: Settings) -> Counters:
    """RedisCounters when REDIS_URL is set (refuses to start, `RedisUnavailable`, when Redis does not answer),
    else MemoryCounters on the wall clock."""
    if settings.redis is None:
        return MemoryCounters(clock_us, max_counters=settings.max_counters)
    return await RedisCounters.open(settings.redis)


OpenCounters = Callable[[Settings], Awaitable[Counters]]


def builder(
    counters_for: OpenCounters = open_counters, clock: Callable[[], int] = clock_us
) -> Callable[[Wiring[Settings, NoStore]], Awaitable[Assembly]]:
    """The build function over these counters and this clock (tests give theirs; SERVICE uses the defaults)."""

    async def build(wiring: Wiring[Settings, NoStore]) -> Assembly:
        settings = wiring.settings
        limits = load_limits(settings, clock)
        closers: list[Closer] = []
        try:
            counters = await counters_for(settings)
            closers.append(counters.close)
            limiter = RateLimiter(
                lambda: limits.current, counters, store_timeout_s=settings.store_timeout_s, clock_us=clock
            )
            servicer = RateLimitServicer(limiter, limits)
            closers.append(servicer.close)  # its last batch done before the counters close
            envoy = RlsServicer(limiter, servicer.batcher.submit)
        except BaseException:
            for closer in reversed(closers):
                with contextlib.suppress(Exception):
                    await closer()
            raise

        async def watch_limits() -> None:
            await limits.watch(settings.reload_interval_s)

        return Assembly(
            servicer,
            tasks=[watch_limits],
            closers=closers,
            core=limiter,
            extra_services=[Service(rls.FULL_NAME, rls.register(envoy))],
            health=counters.healthy,
        )

    return build


build = builder()


SERVICE: Declaration[Settings, NoStore] = Declaration(
    name="ratelimit",
    summary=SUMMARY,
    register=ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server,
    rules=lambda settings: policy.rules(settings.guard_workloads),
    settings=Settings.read,
    stores=NO_DATABASE,
    build=build,
)
