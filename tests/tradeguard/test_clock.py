"""The clock's state from the kernel (tradeguard/clock.py): on this machine adjtimex answers, read only, with
a known state and plausible errors, the same state libc's ntp_adjtime reports; TIME_ERROR is UNSYNCHRONIZED; a call
that fails (a real kernel error, an exception, no libc) is UNSPECIFIED and never raises."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import pytest

from tradeguard import clock
from tradeguard.clock import TIME_ERROR, ClockSync, Timex, clock_state

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="adjtimex is Linux's")


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    assert name is not None
    return ctypes.CDLL(name, use_errno=True)


@linux_only
def test_the_kernel_answers_on_this_machine() -> None:
    sync, estimated, maximum = clock_state()
    assert sync in (ClockSync.SYNCHRONIZED, ClockSync.UNSYNCHRONIZED)
    assert isinstance(estimated, int)
    assert isinstance(maximum, int)
    assert 0 <= estimated <= 100_000_000
    assert 0 <= maximum <= 100_000_000
    assert ctypes.sizeof(Timex) == (208 if ctypes.sizeof(ctypes.c_long) == 8 else 128)


@linux_only
def test_the_state_is_the_one_ntp_adjtime_reports() -> None:
    ntp_adjtime = _libc().ntp_adjtime
    ntp_adjtime.argtypes = (ctypes.POINTER(Timex),)
    timex = Timex()
    answer = ntp_adjtime(ctypes.pointer(timex))
    assert answer >= 0
    expected = ClockSync.UNSYNCHRONIZED if answer == TIME_ERROR else ClockSync.SYNCHRONIZED
    assert clock_state()[0] is expected


def test_the_kernels_answer_and_fields_are_read() -> None:
    def unsynchronised(pointer: Any) -> int:
        assert pointer.contents.modes == 0  # read only
        pointer.contents.esterror = 12
        pointer.contents.maxerror = 16_000_000
        return TIME_ERROR

    def synchronised(pointer: Any) -> int:
        pointer.contents.esterror = 3
        pointer.contents.maxerror = 250
        return 0  # TIME_OK

    assert clock_state(unsynchronised) == (ClockSync.UNSYNCHRONIZED, 12, 16_000_000)
    assert clock_state(synchronised) == (ClockSync.SYNCHRONIZED, 3, 250)


@linux_only
def test_a_real_kernel_error_is_unspecified() -> None:
    adjtimex = _libc().adjtimex
    adjtimex.argtypes = (ctypes.c_void_p,)

    def bad_address(pointer: Any) -> int:
        return int(adjtimex(None))  # EFAULT: the kernel answers -1

    assert clock_state(bad_address) == (ClockSync.UNSPECIFIED, 0, 0)


def test_an_exception_is_unspecified() -> None:
    def broken(pointer: Any) -> int:
        raise OSError("no adjtimex here")

    assert clock_state(broken) == (ClockSync.UNSPECIFIED, 0, 0)


def test_no_libc_is_unspecified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "_libc_adjtimex", lambda: None)
    assert clock_state() == (ClockSync.UNSPECIFIED, 0, 0)
