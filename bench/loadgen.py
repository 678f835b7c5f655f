"""A reusable async load generator.

- `closed_loop`: N callers for D seconds, each sending its next call when the last one returned → RPS, p50, p99.
  Its latency at many callers is mostly queueing (Little's law): it measures throughput.
- `open_loop`: calls sent at a fixed arrival rate whatever the answers do (call i is INTENDED at start + i/rate);
  each call's latency is measured from its intended send time, not from when it was actually sent, so a sender
  that fell behind (its loop busy) or a server that queues cannot hide the wait ("coordinated omission"). Sends
  more than `late_ms` after their intended time are counted as late; calls beyond `max_in_flight` outstanding are
  not sent and counted as dropped (and a dropped call is not a latency: read the count beside the percentiles).
  It measures latency at a given load (p50, p99, p99.9).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tradeguard import testing


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds of this process (the client) and of `pids` (servers)."""
    return time.process_time() + sum(process_cpu_s(pid) for pid in pids)


@dataclass(frozen=True)
class Result:
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: float | None = None  # CPU of the client and the servers measured, over the measured window

    @property
    def cpu_us_per_call(self) -> float | None:
        """CPU per call, both ends: far steadier between rounds than throughput on a shared 2-core machine."""
        return None if self.cpu_s is None or not self.calls else self.cpu_s / self.calls * 1e6

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def line(self, label: str) -> str:
        cpu = self.cpu_us_per_call
        return (
            f"{label:<28} {self.rps:9.0f} calls/s   p50 {self.percentile(50):6.2f} ms   "
            f"p99 {self.percentile(99):6.2f} ms   errors {self.errors}"
            + ("" if cpu is None else f"   cpu {cpu:5.0f} us/call")
        )


Call = Callable[[int], Awaitable[object]]


async def closed_loop(
    call: Call, *, concurrency: int, duration: float, warmup: float = 1.0, cpu_of: Sequence[int] = ()
) -> Result:
    """`concurrency` callers each awaiting `call(i)` back to back (i counts calls globally).

    Calls started during `warmup` are not counted; errors are counted and not timed. With `cpu_of` (server
    pids), the CPU of this process and of those over the measured window is reported too (`cpu_us_per_call`)."""
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

    async def cpu_window() -> float:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        return _cpu_s(cpu_of)

    window = asyncio.ensure_future(cpu_window()) if cpu_of else None
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    cpu = None if window is None else _cpu_s(cpu_of) - await window
    return Result(calls=len(latencies), errors=errors, seconds=duration, latencies_ms=latencies, cpu_s=cpu)


@dataclass(frozen=True)
class OpenResult(Result):
    """An open-loop run: `calls` answered in the measured window (`latencies_ms` from each call's intended send
    time), and how well the schedule was kept."""

    rate: float = 0.0  # calls/s asked for
    intended: int = 0  # calls scheduled in the measured window
    late: int = 0  # sent more than `late_ms` after their intended time
    dropped: int = 0  # not sent: `max_in_flight` calls already outstanding
    max_send_lag_ms: float = 0.0  # the worst lag between a call's intended and actual send time

    def open_line(self, label: str) -> str:
        return (
            f"{label:<28} asked {self.rate:7.0f}/s  answered {self.rps:7.0f}/s   p50 {self.percentile(50):6.2f} ms"
            f"   p99 {self.percentile(99):6.2f} ms   p99.9 {self.percentile(99.9):6.2f} ms   max "
            f"{max(self.latencies_ms, default=float('nan')):6.2f} ms   errors {self.errors}   late sends "
            f"{self.late}/{self.intended}   dropped {self.dropped}   worst send lag {self.max_send_lag_ms:.2f} ms"
        )


async def open_loop(
    call: Call,
    rate: float,
    duration: float,
    *,
    warmup: float = 1.0,
    late_ms: float = 1.0,
    max_in_flight: int = 10_000,
    cpu_of: Sequence[int] = (),
) -> OpenResult:
    """`call(i)` sent at `rate` calls/s for `warmup` + `duration` seconds (see the module); only calls intended in
    the last `duration` seconds are counted. Waits for every call sent before it returns."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    total = int((warmup + duration) * rate)
    first_measured = int(warmup * rate)
    latencies: list[float] = []
    errors = late = dropped = 0
    worst_lag = 0.0
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int, intended: float) -> None:
        nonlocal errors
        try:
            await call(i)
        except Exception:
            if i >= first_measured:
                errors += 1
            return
        if i >= first_measured:
            latencies.append((time.perf_counter() - intended) * 1000)

    async def cpu_window() -> float:
        await asyncio.sleep(max(0.0, start + first_measured * interval - time.perf_counter()))
        return _cpu_s(cpu_of)

    start = time.perf_counter() + 0.005
    window = asyncio.ensure_future(cpu_window()) if cpu_of else None
    i = 0
    while i < total:
        now = time.perf_counter()
        intended = start + i * interval
        if intended > now:
            await asyncio.sleep(intended - now)  # the loop's timer: sends due meanwhile go together below
            continue
        while i < total and start + i * interval <= now:  # every call due by now, at once
            intended = start + i * interval
            lag = now - intended
            if i >= first_measured:
                worst_lag = max(worst_lag, lag)
                late += lag * 1000 > late_ms
            if len(in_flight) >= max_in_flight:
                dropped += i >= first_measured
            else:
                task = loop.create_task(one(i, intended))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            i += 1
        await asyncio.sleep(0)  # let the calls just created send before the next look at the clock
    if in_flight:
        await asyncio.wait(set(in_flight))
    cpu = None if window is None else _cpu_s(cpu_of) - await window
    return OpenResult(
        calls=len(latencies),
        errors=errors,
        seconds=duration,
        latencies_ms=latencies,
        cpu_s=cpu,
        rate=rate,
        intended=total - first_measured,
        late=late,
        dropped=dropped,
        max_send_lag_ms=worst_lag * 1000,
    )


async def fixed_rate_server_cpu(
    call: Callable[[int], Awaitable[object]],
    pid: int,
    rate: int,
    seconds: float,
    *,
    return_exceptions: bool = False,
) -> float:
    """Server CPU per call (µs) of process `pid` with calls started at `rate` calls/s for `seconds` (open loop),
    all answered: the same load for every mode compared, so that what a mode adds is not mixed with how a
    saturated server batches its work. A failed call fails the measurement unless `return_exceptions`."""
    tasks: list[asyncio.Future[object]] = []
    before = process_cpu_s(pid)
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        while len(tasks) < max(1, int(elapsed * rate)):  # the first call at once
            tasks.append(asyncio.ensure_future(call(len(tasks))))
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks, return_exceptions=return_exceptions)
    return (process_cpu_s(pid) - before) / max(1, len(tasks)) * 1e6


def median_cpu_ratio(numerators: list[Result], denominators: list[Result]) -> float:
    """Median over rounds of CPU per call, numerator over denominator (above 1: the numerator costs more)."""
    return statistics.median(
        (a.cpu_us_per_call or 0.0) / (b.cpu_us_per_call or float("inf"))
        for a, b in zip(numerators, denominators, strict=True)
    )


def median_ratio(numerators: list[Result], denominators: list[Result]) -> float:
    return statistics.median(a.rps / b.rps for a, b in zip(numerators, denominators, strict=True))


def tmpfs() -> str | None:
    """/dev/shm where it can be written (a benchmark's databases and logs off the disk's fsync), else None: the
    system's temporary directory."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


async def until_answered(probe: Callable[[], Awaitable[object]], what: str, attempts: int = 200) -> None:
    """Until `probe()` (a call with a short deadline) answers, every 0.1 s: a server process just started."""
    import grpc  # only the benchmarks that start servers need it

    for _ in range(attempts):
        try:
            await probe()
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not ready")


# the kit's: never the same port twice in one process (the kernel can offer one port to two askings in a row)
free_port = testing.free_port


def load_arguments(description: str | None, *, rounds: int = 3) -> argparse.ArgumentParser:
    """A benchmark's command line with the load options every benchmark takes (callers, seconds, rounds)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per round (default 5)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"rounds (default {rounds})")
    return parser
