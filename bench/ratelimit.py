"""Rate-limit decisions per second: the service beside the raw rate of its own Lua script, in one run.

Two ways to decide the same request (one subject per caller; two limits per request, a per-second and a per-day
sliding window, both far above the load so every request is allowed and does the same work), on the machine's
Redis (127.0.0.1:6379), alternating round by round:

  script    the rate limiter's Lua script (services.ratelimit.counters_redis.EVALUATE) called by SHA from
            redis-py in this process: one EVALSHA per decision, N concurrent callers (the raw rate)
  service   CheckQuota over mutual TLS to `python -m services.ratelimit` (its counters in the same Redis), N
            concurrent callers, one unary RPC each; the service batches concurrent calls into one pipelined round
            trip
  batched   the same service as a guard calls it: the N callers' checks go through the kit's adaptive batcher
            (tradeguard.batching) into CheckQuotaBatch RPCs, as the guard's quota stage sends them

Printed per round: decisions/s, p50/p99 latency, and µs of CPU per decision of the service process and of
redis-server (envoyproxy/ratelimit, in Go, publishes about 9 µs per decision); then the median ratio of the
service to the script (aim, issue 8: 0.5 or more) and the service's RSS before and after the load. The load
generator (this process) shares the machine's cores with both: read the ratios of one run, not the absolute rates.
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import asyncio
import os
import secrets
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from bench.guard import REDIS_URL, Layout, rss_mib, serving, start_ratelimit
from bench.loadgen import Call, Result, closed_loop, load_arguments, process_cpu_s, tmpfs
from bench.mesh import dev_pki
from services.ratelimit.counters_redis import EVALUATE, script_call
from services.ratelimit.limits_file import parse_limits
from services.ratelimit.model import Charge, Evaluation
from tradeguard.batching import Batcher, Outcome
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc

MODES = ("script", "service", "batched")
AIM = 0.5
OPERATION = "/tradeguard.trading.v1.TradingService/PlaceOrder"
LIMITS = """\
version: 1
default_tier: bench
operations:
  default: {requests: 1}
tiers:
  bench:
    requests:
      - {name: per-second, limit: 1000000000, window: 1s}
      - {name: per-day, limit: 1000000000000, window: 1d}
"""


@dataclass
class Round:
    result: Result
    service_us: float  # CPU µs per decision of the rate-limit service
    redis_us: float  # CPU µs per decision of redis-server


def redis_pid() -> int:
    import redis

    with redis.Redis.from_url(REDIS_URL) as r:
        return int(r.info("server")["process_id"])


def script_calls(client: aioredis.Redis, run: str) -> Call:
    """Each call: the script for one caller's subject, as RedisCounters would send it (by SHA)."""
    config = parse_limits(LIMITS, "bench")
    limits = config.tiers["bench"].groups["requests"]
    charges = tuple(Charge(limit, 1) for limit in limits)

    async def call(i: int) -> object:
        evaluation = Evaluation(f"bench-{run}-{i % 64}", charges)
        (reply,) = await EVALUATE(client, *script_call([evaluation], 0))
        assert reply[0] == 1
        return reply

    return call


def service_calls(stub: ratelimit_pb2_grpc.RateLimitServiceAsyncStub, run: str) -> Call:
    async def call(i: int) -> object:
        reply = await stub.CheckQuota(
            pb.CheckQuotaRequest(
                check=pb.QuotaCheck(subject=f"bench-{run}-{i % 64}", operation=OPERATION, cost=1)
            ),
            timeout=10,
        )
        assert reply.decision.allowed
        return reply

    return call


def batched_calls(
    stub: ratelimit_pb2_grpc.RateLimitServiceAsyncStub, run: str
) -> tuple[Call, Batcher[pb.QuotaCheck, bool]]:
    async def send(checks: Sequence[pb.QuotaCheck]) -> list[Outcome[bool]]:
        reply = await stub.CheckQuotaBatch(pb.CheckQuotaBatchRequest(checks=checks), timeout=10)
        return [Outcome.ok(d.allowed) for d in reply.decisions]

    batcher: Batcher[pb.QuotaCheck, bool] = Batcher(send, max_batch=256, name="bench-quota")

    async def call(i: int) -> object:
        allowed = await batcher.submit(pb.QuotaCheck(subject=f"bench-{run}-{i % 64}", operation=OPERATION))
        assert allowed
        return allowed

    return call, batcher


async def measure(call: Call, pids: dict[str, int], concurrency: int, duration: float) -> Round:
    await closed_loop(call, concurrency=concurrency, duration=0.5, warmup=0)
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    result = await closed_loop(call, concurrency=concurrency, duration=duration, warmup=0)
    per = {
        name: (process_cpu_s(pid) - before[name]) / max(1, result.calls) * 1e6 for name, pid in pids.items()
    }
    return Round(result, per["ratelimit"], per["redis"])


async def cleanup(client: aioredis.Redis, run: str) -> None:
    async for key in client.scan_iter(match=f"tg:rl:{{bench-{run}-*", count=1000):
        await client.unlink(key)


async def run(concurrency: int, duration: float, rounds: int) -> dict[str, list[Round]]:
    tag = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(dir=tmpfs()) as tmp:
        layout = Layout(Path(tmp))
        dev_pki(layout.home, ("ratelimit", "trading", "ops"))
        client = aioredis.Redis.from_url(REDIS_URL, max_connections=concurrency + 8)
        try:
            start_ratelimit(layout, LIMITS)
            await serving(layout, "ratelimit")
            proc = layout.procs["ratelimit"]
            pids = {"ratelimit": proc.pid, "redis": redis_pid()}
            workload = tls.Workload.of(layout.paths, "trading")
            async with MeshChannel(f"127.0.0.1:{proc.port}", "ratelimit", workload) as channel:
                stub = ratelimit_pb2_grpc.RateLimitServiceStub(channel)
                batched, batcher = batched_calls(stub, tag)
                calls = {
                    "script": script_calls(client, tag),
                    "service": service_calls(stub, tag),
                    "batched": batched,
                }
                rss_before = rss_mib(proc.pid)
                print(
                    f"rate-limit decisions, {concurrency} concurrent callers, {duration:g} s per round, {rounds} "
                    f"rounds, {os.cpu_count()} CPUs; 2 sliding-window limits per decision, Redis {REDIS_URL}"
                )
                results: dict[str, list[Round]] = {mode: [] for mode in MODES}
                for r in range(rounds):
                    order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
                    for mode in order:
                        rnd = await measure(calls[mode], pids, concurrency, duration)
                        results[mode].append(rnd)
                        print(
                            f"{rnd.result.line(f'round {r + 1} {mode}')}   CPU us/decision: ratelimit "
                            f"{rnd.service_us:5.1f}  redis {rnd.redis_us:5.1f}",
                            flush=True,
                        )
                report(results, rss_before, rss_mib(proc.pid), batcher)
                return results
        finally:
            layout.stop()
            await cleanup(client, tag)
            await client.aclose()


def report(
    results: dict[str, list[Round]],
    rss_before: float,
    rss_after: float,
    batcher: Batcher[pb.QuotaCheck, bool],
) -> None:
    script = results["script"]
    print("\nthe service against the raw script (median of rounds):")
    for mode, rounds in results.items():
        print(
            f"  {mode:<8} {statistics.median(x.result.rps for x in rounds):9.0f} decisions/s   "
            f"p50 {statistics.median(x.result.percentile(50) for x in rounds):6.2f} ms   "
            f"CPU us/decision: ratelimit {statistics.median(x.service_us for x in rounds):5.1f}  "
            f"redis {statistics.median(x.redis_us for x in rounds):5.1f}"
        )
    for mode in ("service", "batched"):
        ratio = statistics.median(
            a.result.rps / b.result.rps for a, b in zip(results[mode], script, strict=True)
        )
        verdict = "met" if ratio >= AIM else "missed"
        print(f"  {mode} / script: {ratio:.3f} (aim {AIM:g} or more: {verdict})")
    if batcher.batches:
        print(f"  batched: {batcher.items / batcher.batches:.1f} checks per CheckQuotaBatch on average")
    print(f"RSS MiB of the rate-limit service before -> after the load: {rss_before:.0f} -> {rss_after:.0f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = load_arguments(__doc__, rounds=3)
    parser.set_defaults(concurrency=64)
    args = parser.parse_args(argv)
    asyncio.run(run(args.concurrency, args.duration, args.rounds))


if __name__ == "__main__":
    main()
