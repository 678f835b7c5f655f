"""The limits file hot-reloaded (services/ratelimit/reload.py), on real files: a change swaps the limits in force;
a bad, unreadable or deleted file keeps the last good limits and says so (in `last_error` and in ONE log line per
distinct failure); a file replaced by rename is picked up; a fixed file clears the error; the watch task follows
the file and survives bad ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from services.ratelimit.limits_file import LimitsError
from services.ratelimit.reload import LimitsFile
from tradeguard.testing import FakeClock, LogCapture, eventually

GOOD = """\
version: 1
default_tier: standard
operations:
  default: {requests: 1}
tiers:
  standard:
    requests:
      - {name: per-second, limit: 20, window: 1s}
"""
OTHER = GOOD.replace("limit: 20", "limit: 30")  # same size as GOOD
BAD = GOOD.replace("window: 1s", "window: 3x")
WORSE = GOOD.replace("limit: 20", "limit: no")


def count_of(limits: LimitsFile) -> int:
    return limits.current.tiers["standard"].groups["requests"][0].count


def events(logs: LogCapture, event: str) -> list[dict[str, Any]]:
    return [line for line in logs.lines() if line.get("event") == event]


def write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "limits.yaml"
    file.write_text(GOOD)
    return file


def test_the_first_load_must_succeed(tmp_path: Path) -> None:
    clock = FakeClock()
    with pytest.raises(LimitsError, match=r"missing\.yaml: cannot read the limits file"):
        LimitsFile(tmp_path / "missing.yaml", clock)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    with pytest.raises(LimitsError, match=rf"^{bad}:8: tiers\.standard\.requests\[0\]\.window: '3x' is not"):
        LimitsFile(bad, clock)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(GOOD.encode() + b"\n# \xff\n")
    with pytest.raises(LimitsError, match=r"binary\.yaml:10: \(file\): not UTF-8"):
        LimitsFile(binary, clock)


def test_a_loaded_file_is_in_force_and_logged(path: Path) -> None:
    logs = LogCapture()
    clock = FakeClock()
    limits = LimitsFile(path, clock)
    assert (limits.current.source, limits.loaded_us, limits.last_error) == (str(path), clock(), "")
    assert count_of(limits) == 20
    (loaded,) = events(logs, "ratelimit.limits_loaded")
    assert (loaded["source"], loaded["sha256"], loaded["tiers"]) == (
        str(path),
        limits.current.sha256,
        ["standard"],
    )
    assert limits.check() is False  # unchanged


def test_a_changed_file_is_swapped_in(path: Path) -> None:
    clock = FakeClock()
    limits = LimitsFile(path, clock)
    before = limits.current
    clock.advance_s(5)
    path.write_text(GOOD.replace("limit: 20", "limit: 25000"))  # another size
    assert limits.check() is True
    assert count_of(limits) == 25000
    assert limits.current.sha256 != before.sha256
    assert limits.loaded_us == clock()
    assert limits.check() is False


def test_a_same_size_rewrite_with_the_same_mtime_is_seen(path: Path) -> None:
    # written within the timestamp granularity of the first write, the stat may be all the same: the file was
    # read "racily" (just after it was modified), so it is read again
    limits = LimitsFile(path, FakeClock())
    stat = path.stat()
    path.write_text(OTHER)  # in place: same inode, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert limits.check() is True
    assert count_of(limits) == 30


def test_rewriting_the_same_content_swaps_nothing(path: Path) -> None:
    clock = FakeClock()
    limits = LimitsFile(path, clock)
    loaded_us = limits.loaded_us
    clock.advance_s(1)
    path.write_text(GOOD)
    os.utime(path, ns=(0, 0))
    assert limits.check() is False
    assert limits.loaded_us == loaded_us


OLD_NS = 1_600_000_000_000_000_000  # an mtime long past: the file is not "racy", only its stamp can tell


def test_a_file_replaced_by_rename_is_picked_up(path: Path) -> None:
    os.utime(path, ns=(OLD_NS, OLD_NS))
    limits = LimitsFile(path, FakeClock())
    new = path.with_name(".limits.yaml.tmp")
    new.write_text(OTHER)  # the same size...
    os.utime(new, ns=(OLD_NS, OLD_NS))  # ...and mtime: the inode tells
    os.replace(new, path)
    assert limits.check() is True
    assert count_of(limits) == 30


def test_a_symlink_swap_as_a_configmap_does_is_picked_up(tmp_path: Path) -> None:
    # Kubernetes mounts a ConfigMap as key -> ..data/key, ..data -> ..<timestamp>/ and swaps ..data atomically
    for version, text in (("..v1", GOOD), ("..v2", OTHER)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "limits.yaml").write_text(text)
        os.utime(tmp_path / version / "limits.yaml", ns=(OLD_NS, OLD_NS))
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "limits.yaml").symlink_to("..data/limits.yaml")
    limits = LimitsFile(tmp_path / "limits.yaml", FakeClock())
    assert count_of(limits) == 20
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert limits.check() is True
    assert count_of(limits) == 30


def test_a_bad_file_keeps_the_last_good_and_says_so_once(path: Path) -> None:
    clock = FakeClock()
    limits = LimitsFile(path, clock)
    good, loaded_us = limits.current, limits.loaded_us
    logs = LogCapture()
    clock.advance_s(1)
    path.write_text(BAD)
    for _ in range(3):
        assert limits.check() is False
    path.write_text(BAD)  # written again: still the same failure
    os.utime(path, ns=(1, 1))
    assert limits.check() is False
    assert limits.current is good
    assert limits.loaded_us == loaded_us
    assert limits.last_error.startswith(
        f"{path}:8: tiers.standard.requests[0].window: '3x' is not a duration"
    )
    (rejected,) = events(logs, "ratelimit.limits_rejected")
    assert rejected["level"] == "warning"
    assert rejected["error"] == limits.last_error
    assert rejected["sha256_in_force"] == good.sha256

    path.write_text(WORSE)  # another failure: said once more
    assert limits.check() is False
    assert limits.last_error.startswith(f"{path}:8: tiers.standard.requests[0].limit: 'no' is a boolean")
    assert len(events(logs, "ratelimit.limits_rejected")) == 2

    path.write_text(OTHER)  # fixed
    assert limits.check() is True
    assert limits.last_error == ""
    assert count_of(limits) == 30
    assert events(logs, "ratelimit.limits_loaded")[-1]["sha256"] == limits.current.sha256

    path.write_text(BAD)  # the first failure again, after a success: said again
    assert limits.check() is False
    assert len(events(logs, "ratelimit.limits_rejected")) == 3


def test_a_bad_file_put_back_to_the_good_content_clears_the_error(path: Path) -> None:
    limits = LimitsFile(path, FakeClock())
    path.write_text(BAD)
    assert limits.check() is False
    assert limits.last_error
    path.write_text(GOOD)
    assert limits.check() is False  # the limits in force already
    assert limits.last_error == ""


def test_a_deleted_file_keeps_the_last_good_and_says_so(path: Path) -> None:
    limits = LimitsFile(path, FakeClock())
    good = limits.current
    logs = LogCapture()
    path.unlink()
    assert limits.check() is False
    assert limits.check() is False
    assert limits.current is good
    assert limits.last_error == f"{path}: the file is missing; the last good limits stay in force"
    assert len(events(logs, "ratelimit.limits_rejected")) == 1
    path.write_text(GOOD)  # back as it was
    assert limits.check() is False
    assert limits.last_error == ""
    path.write_text(OTHER)
    assert limits.check() is True


def test_an_unreadable_file_keeps_the_last_good(path: Path) -> None:
    limits = LimitsFile(path, FakeClock())
    path.unlink()
    path.mkdir()  # a directory where the file was: open() fails
    assert limits.check() is False
    assert "Is a directory" in limits.last_error
    assert count_of(limits) == 20


def test_a_file_too_large_is_refused(path: Path) -> None:
    limits = LimitsFile(path, FakeClock())
    path.write_text(GOOD + "#" * (1 << 20))
    assert limits.check() is False
    assert limits.last_error == f"{path}:1: (file): more than the {1 << 20} bytes allowed"


async def test_the_watch_follows_the_file_and_survives_bad_ones(path: Path) -> None:
    limits = LimitsFile(path, FakeClock())
    watch = asyncio.create_task(limits.watch(0.001))
    try:
        write(path, BAD)
        await eventually(lambda: limits.last_error != "")
        assert count_of(limits) == 20
        write(path, OTHER)
        await eventually(lambda: count_of(limits) == 30)
        assert limits.last_error == ""
        assert not watch.done()
    finally:
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch


async def test_the_watch_outlives_a_check_that_raises(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = LimitsFile(path, FakeClock())
    calls = 0
    real_check = limits.check

    def failing_check() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return real_check()

    monkeypatch.setattr(limits, "check", failing_check)
    logs = LogCapture()
    watch = asyncio.create_task(limits.watch(0.001))
    try:
        await eventually(lambda: calls >= 3)
        assert not watch.done()
        (failed,) = events(logs, "ratelimit.limits_check_failed")
        assert "a bug" in failed["error"]
    finally:
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch
