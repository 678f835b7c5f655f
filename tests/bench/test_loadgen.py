"""The load generator's open loop (bench/loadgen.py `open_loop`): every scheduled call is sent once, latency is
counted from the intended send time, errors and calls beyond the in-flight bound are counted, not timed. No timing
is asserted (this machine's speed decides how late a send is)."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from bench.loadgen import fixed_rate_server_cpu, open_loop, until_answered


async def test_every_scheduled_call_is_sent_once_and_answered() -> None:
    seen: list[int] = []

    async def call(i: int) -> object:
        seen.append(i)
        return None

    result = await open_loop(call, rate=400, duration=0.25, warmup=0.05)
    assert sorted(seen) == list(range(len(seen))) and len(seen) == int(0.3 * 400)
    assert result.intended == len(seen) - int(0.05 * 400) == result.calls  # the warm-up's calls not counted
    assert result.errors == 0 and result.dropped == 0
    assert 0 <= result.late <= result.intended
    assert all(latency >= 0 for latency in result.latencies_ms)
    assert result.rate == 400 and result.seconds == 0.25


async def test_latency_counts_from_the_intended_send_time_so_a_late_sender_is_not_hidden() -> None:
    """The sender's loop is held (a blocking stretch after the first call): the calls due meanwhile are sent late,
    all at once, and their latency includes the wait."""
    blocked = False

    async def call(i: int) -> object:
        nonlocal blocked
        if not blocked:
            blocked = True
            asyncio.get_running_loop().call_soon(_hold, 0.05)
        return None

    result = await open_loop(call, rate=1000, duration=0.2, warmup=0, late_ms=1.0)
    assert result.calls == result.intended
    assert result.late > 0 and result.max_send_lag_ms >= 40  # held for 50 ms
    assert max(result.latencies_ms) >= 40  # ... and it shows in the latency, not only in the lag


def _hold(seconds: float) -> None:
    """Keep the event loop busy for `seconds` (a stand-in for a sender that fell behind)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_calls_beyond_the_in_flight_bound_are_dropped_not_sent() -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def call(i: int) -> object:
        started.append(i)
        await release.wait()  # outstanding until the schedule is over: the bound is reached
        return None

    loop = asyncio.get_running_loop()
    loop.call_later(0.2 + 0.5, release.set)  # after the last intended send (timers run in deadline order)
    result = await open_loop(call, rate=100, duration=0.2, warmup=0, max_in_flight=2)
    assert started == [0, 1]
    assert result.dropped == result.intended - 2 and result.calls == 2 and result.errors == 0


async def test_a_failing_call_is_an_error_and_not_a_latency() -> None:
    async def call(i: int) -> object:
        raise RuntimeError("refused")

    result = await open_loop(call, rate=200, duration=0.1, warmup=0)
    assert result.errors == result.intended and result.calls == 0 and result.latencies_ms == []


@pytest.mark.parametrize(("rate", "duration"), [(0, 1.0), (10, 0), (-1, 1.0)])
async def test_a_rate_and_a_duration_are_positive(rate: float, duration: float) -> None:
    async def call(i: int) -> object:
        return None

    with pytest.raises(ValueError, match="positive"):
        await open_loop(call, rate, duration)


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "starting", "test"
    )


async def test_until_answered_waits_for_a_starting_server_and_gives_up_after_its_attempts() -> None:
    tries: list[int] = []

    async def starting() -> object:
        tries.append(1)
        if len(tries) < 3:
            raise _unavailable()
        return "up"

    await until_answered(starting, "server")
    assert len(tries) == 3

    async def never() -> object:
        raise _unavailable()

    with pytest.raises(RuntimeError, match="key vault not ready"):
        await until_answered(never, "key vault", attempts=2)


async def test_the_fixed_rate_measure_waits_for_every_call_it_started_and_fails_on_a_failed_one() -> None:
    started: list[int] = []
    answered: list[int] = []

    async def call(i: int) -> object:
        started.append(i)
        await asyncio.sleep(0)
        answered.append(i)
        return None

    cpu_us = await fixed_rate_server_cpu(call, os.getpid(), rate=500, seconds=0.1)
    assert started == list(range(len(started))) and 1 <= len(started) <= 50
    assert sorted(answered) == started and cpu_us >= 0

    async def failing(i: int) -> object:
        raise RuntimeError(f"call {i} failed")

    with pytest.raises(RuntimeError, match="failed"):
        await fixed_rate_server_cpu(failing, os.getpid(), rate=500, seconds=0.05)
    assert (
        await fixed_rate_server_cpu(failing, os.getpid(), rate=500, seconds=0.05, return_exceptions=True) >= 0
    )
