"""The clock's synchronisation state, as MiFID II RTS 25 asks an event to carry it: read from the kernel (the
audit service's entries and the guard's audit stage both record it).

`clock_state()` calls `adjtimex(2)` through libc (ctypes) READ-ONLY (`modes = 0`: nothing is set, no privilege
needed) and answers `(sync, estimated_error_us, max_error_us)`:

- `sync`: `ClockSync.UNSYNCHRONIZED` when the kernel answers `TIME_ERROR` (the clock is not synchronised: the
  `STA_UNSYNC` status, set until an NTP/PTP daemon disciplines it, or `maxerror` past 16 s), else
  `ClockSync.SYNCHRONIZED`;
- `estimated_error_us`, `max_error_us`: the kernel's `esterror` and `maxerror` (microseconds).

It never fails its caller: where the call is unavailable (not Linux, no libc, refused by a seccomp filter, any
error) the answer is `(ClockSync.UNSPECIFIED, 0, 0)`. `adjtimex` may be injected (a function taking a pointer
to a `Timex` and returning the kernel's answer) for tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import functools
from collections.abc import Callable
from typing import Any, Final

__all__ = ["TIME_ERROR", "ClockSync", "Timex", "clock_state"]


class ClockSync(enum.IntEnum):
    """The kernel's verdict on the clock (tradeguard.audit.v1.ClockSync's numbers)."""

    UNSPECIFIED = 0
    SYNCHRONIZED = 1
    UNSYNCHRONIZED = 2


TIME_ERROR: Final = 5  # adjtimex's answer for an unsynchronised clock

_UNSPECIFIED: Final = (ClockSync.UNSPECIFIED, 0, 0)


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class Timex(ctypes.Structure):
    """Linux `struct timex` (<sys/timex.h>), as glibc lays it out."""

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    )


Adjtimex = Callable[[Any], int]


@functools.cache
def _libc_adjtimex() -> Adjtimex | None:
    try:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        function = ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.POINTER(Timex),)
    function.restype = ctypes.c_int
    return function


def clock_state(adjtimex: Adjtimex | None = None) -> tuple[ClockSync, int, int]:
    """(sync, estimated error µs, maximum error µs) from the kernel; UNSPECIFIED if it cannot be read."""
    try:
        function = adjtimex if adjtimex is not None else _libc_adjtimex()
        if function is None:
            return _UNSPECIFIED
        timex = Timex()  # zeroed: modes = 0, read only
        answer = int(function(ctypes.pointer(timex)))
        if answer < 0:
            return _UNSPECIFIED
        sync = ClockSync.UNSYNCHRONIZED if answer == TIME_ERROR else ClockSync.SYNCHRONIZED
        return sync, max(0, int(timex.esterror)), max(0, int(timex.maxerror))
    except Exception:  # never fail the caller
        return _UNSPECIFIED
