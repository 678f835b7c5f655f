"""A reusable async load generator: closed loop (N callers for D seconds) → RPS, p50, p99."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def line(self, label: str) -> str:
        return (
            f"{label:<28} {self.rps:9.0f} calls/s   p50 {self.percentile(50):6.2f} ms   "
            f"p99 {self.percentile(99):6.2f} ms   errors {self.errors}"
        )


Call = Callable[[int], Awaitable[object]]


async def closed_loop(call: Call, *, concurrency: int, duration: float, warmup: float = 1.0) -> Result:
    """`concurrency` callers each awaiting `call(i)` back to back (i counts calls globally).

    Calls finishing during `warmup` are not counted; errors are counted and not timed."""
    counter = 0
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration

    async def caller() -> None:
        nonlocal counter, errors
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            counter += 1
            try:
                await call(counter)
            except Exception:
                if t0 >= measure_from:
                    errors += 1
                continue
            if t0 >= measure_from:
                latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Result(calls=len(latencies), errors=errors, seconds=duration, latencies_ms=latencies)


def median_ratio(numerators: list[Result], denominators: list[Result]) -> float:
    return statistics.median(a.rps / b.rps for a, b in zip(numerators, denominators, strict=True))


def free_port() -> int:
    """A loopback port free at the time of asking, for a server the benchmark starts as a process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
