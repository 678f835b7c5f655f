"""The event loop a service runs on: uvloop by default, asyncio's own by configuration.

`TRADEGUARD_EVENT_LOOP` (shared by every service): ``uvloop`` (the default) or ``asyncio``. Measured on this
machine (bench/README.md, "event loop"): a bare grpc.aio echo over mutual TLS costs about 13-17 % less server CPU
per call on uvloop, at one call at a time and at 1,000 calls/s; the full guarded PlaceOrder, across its five
processes, about 12 % less on average over four alternating runs (0-20 % per run: within one run's noise here).
grpc.aio drives its completion queue through the loop's reader callbacks, which uvloop implements like asyncio's.
`asyncio` is there for a platform without uvloop's wheels and for telling a loop problem from ours.

The services' runner (`tradeguard.service.main`) and the benchmarks' server processes start through `run`, so a
benchmark measures the loop production runs. Tests run services in process on pytest's asyncio loop; the
services started as processes (`tradeguard up`, `python -m services.<name>`) run on the configured one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, MutableMapping
from typing import Any, Final, Literal, TypeVar

import uvloop

from tradeguard.settings import Env

__all__ = ["EVENT_LOOPS", "EventLoop", "from_env", "run", "running"]

EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOPS: Final[tuple[EventLoop, ...]] = ("uvloop", "asyncio")
DEFAULT: Final[EventLoop] = "uvloop"

T = TypeVar("T")


def from_env(environ: MutableMapping[str, str] | None = None) -> EventLoop:
    """`TRADEGUARD_EVENT_LOOP`, checked (`SettingsError` naming it for anything but the two loops)."""
    return Env("TRADEGUARD", environ).choice("EVENT_LOOP", DEFAULT, EVENT_LOOPS)


def run(main: Coroutine[Any, Any, T], loop: EventLoop | None = None) -> T:
    """`main` to completion on a new event loop of the kind `loop`, by default the one `TRADEGUARD_EVENT_LOOP`
    names (as `asyncio.run` does: the loop is closed after, its async generators and default executor shut
    down)."""
    if loop is None:
        loop = from_env()
    if loop == "uvloop":
        return uvloop.run(main)
    if loop == "asyncio":
        return asyncio.run(main)
    main.close()  # never awaited: no "coroutine was never awaited" warning on top of the error
    raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {loop!r}")


def running() -> EventLoop:
    """The kind of the running event loop (what a service's "serving" log line says it runs on)."""
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"
