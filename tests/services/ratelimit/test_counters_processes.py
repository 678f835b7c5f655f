"""Several OS processes hammering one subject's limit on the machine's Redis at once: never more than the limit.

Each process is a replica of the service: its own `RedisCounters` (its own connections), `now_us=None` (Redis's
clock rules), batches of evaluations of the one subject. The limit's window is a day, so the whole run lies inside
one window and the assertion is exact: with demand well past the limit, exactly the limit is admitted. Every
request also charges a second, loose limit: it counts exactly the admitted requests (all or nothing).
The processes start together: each waits on a Redis list (BLPOP) until the test pushes the start.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from asyncio.subprocess import PIPE
from dataclasses import asdict
from pathlib import Path

import redis

from services.ratelimit.counters_redis import RedisCounters
from services.ratelimit.model import Limit
from tests.services.ratelimit.conftest import LOCAL_REDIS, counted, delete_keys, limit, one
from tradeguard.storage.redis import RedisConfig
from tradeguard.testing import eventually

REPO = Path(__file__).resolve().parents[3]
PROCESSES = 6
REQUESTS_PER_PROCESS = 120
LIMIT = 250  # of 720 requested
HANG_S = 120  # a hang detector only

QUOTA = limit(LIMIT, 86_400, name="per-day", buckets=24)
LOOSE = limit(10**6, 86_400, name="loose", group="orders", buckets=24)

WORKER = """
import asyncio, json, sys
import redis
from services.ratelimit.counters_redis import RedisCounters
from services.ratelimit.model import Limit
from services.ratelimit.model import Charge, Counted, Evaluation, Limit
from tradeguard.storage.redis import RedisConfig

url, subject, barrier, quota, loose, requests, batch = sys.argv[1:8]
quota, loose = (Limit(**json.loads(spec)) for spec in (quota, loose))

async def main() -> None:
    counters = await RedisCounters.open(RedisConfig.from_url(url))
    with redis.Redis.from_url(url.split("?")[0], socket_timeout=None) as sync:
        sync.incr(barrier + ":ready")
        assert sync.blpop([barrier + ":go"], timeout=60) is not None, "never started"
    admitted = refused = unavailable = 0
    sent = 0
    while sent < int(requests):
        n = min(int(batch), int(requests) - sent)
        request = Evaluation(subject, (Charge(quota, 1), Charge(loose, 1)))
        for result in await counters.evaluate([request] * n):
            if not isinstance(result, Counted):
                unavailable += 1
            elif result.allowed:
                admitted += 1
            else:
                refused += 1
        sent += n
    await counters.close()
    print(json.dumps({"admitted": admitted, "refused": refused, "unavailable": unavailable}))

asyncio.run(main())
"""


def _spec(of: Limit) -> str:
    return json.dumps(asdict(of))


async def test_processes_hammering_one_subject_never_get_more_than_the_limit() -> None:
    run = f"t-{secrets.token_hex(6)}"
    subject, barrier = f"{run}:key:shared", f"tg-test:rl:{run}"
    procs: list[asyncio.subprocess.Process] = []
    control = redis.Redis.from_url(LOCAL_REDIS.split("?")[0])
    try:
        for i in range(PROCESSES):
            args = [LOCAL_REDIS, subject, barrier, _spec(QUOTA), _spec(LOOSE), str(REQUESTS_PER_PROCESS)]
            args.append(str(1 + i % 3))  # batches of 1, 2 and 3 evaluations of the one subject
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-c", WORKER, *args, cwd=REPO, stdout=PIPE, stderr=PIPE
                )
            )

        def all_waiting() -> bool:
            assert all(proc.returncode is None for proc in procs), "a worker exited before the start"
            return int(control.get(f"{barrier}:ready") or 0) == PROCESSES

        await eventually(all_waiting, within_s=HANG_S)
        control.rpush(f"{barrier}:go", *["go"] * PROCESSES)

        reports = []
        async with asyncio.timeout(HANG_S):  # a hang detector only
            for proc in procs:
                out, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()[-3000:]
                reports.append(json.loads(out))
        assert sum(r["unavailable"] for r in reports) == 0
        assert sum(r["admitted"] + r["refused"] for r in reports) == PROCESSES * REQUESTS_PER_PROCESS
        assert sum(r["admitted"] for r in reports) == LIMIT
        assert sum(r["admitted"] > 0 for r in reports) >= 2  # they did compete

        counters = await RedisCounters.open(RedisConfig.from_url(LOCAL_REDIS))
        try:
            peek = await one(counters, subject, QUOTA, LOOSE, now_us=None, consume=False)
            assert [c.counted for c in peek.counts] == [
                LIMIT,
                LIMIT,
            ]  # the loose limit: admitted requests only
            assert not counted(peek).allowed
        finally:
            await counters.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        control.delete(f"{barrier}:ready", f"{barrier}:go")
        control.close()
        await delete_keys(LOCAL_REDIS, [f"tg:rl:{{{run}:*"])
