"""The kit's hot-reloaded configuration file (tradeguard/reload.py), with a toy format: the first load must
succeed; a change swaps the configuration; a bad, deleted or oversized file keeps the last good one and says so
once, in the caller's words and log events; the watch follows the file. (The rate limiter's limits file and the
risk file run the same watcher through their own tests: tests/services/ratelimit/test_reload.py,
tests/tradeguard/risk/test_config.py.)"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tradeguard.reload import WatchedFile
from tradeguard.testing import FakeClock, LogCapture, eventually
from tradeguard.yamlfile import Reader, YamlError, compose


class ToyError(YamlError):
    pass


def parse_toy(text: str, source: str) -> int:
    """A toy format: `n: <integer 0..99>`."""
    r = Reader(source, ToyError)
    node = compose(text, source, ToyError)
    if node is None:
        r.fail(None, "", "the file is empty")
    return r.integer(r.fields(node, "", ("n",), ("n",))["n"], "n", 0, 99)


def describe(n: int) -> Mapping[str, Any]:
    return {"n": n}


def toy(path: Path, clock: FakeClock | None = None, max_bytes: int = 1000) -> WatchedFile[int]:
    return WatchedFile(
        path,
        parse_toy,
        clock or FakeClock(),
        name="toy.config",
        what="toy settings",
        error=ToyError,
        describe=describe,
        max_bytes=max_bytes,
    )


def events(logs: LogCapture, event: str) -> list[dict[str, Any]]:
    return [line for line in logs.lines() if line.get("event") == event]


def test_the_first_load_must_succeed(tmp_path: Path) -> None:
    with pytest.raises(ToyError, match=r"toy\.yaml: cannot read the toy settings file: No such file"):
        toy(tmp_path / "toy.yaml")
    (tmp_path / "toy.yaml").write_text("n: 100\n")
    with pytest.raises(ToyError, match=r"toy\.yaml:1: n: 100 is out of range"):
        toy(tmp_path / "toy.yaml")


def test_changes_are_swapped_in_and_failures_keep_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text("n: 1\n")
    clock = FakeClock()
    logs = LogCapture()
    watched = toy(path, clock)
    assert (watched.current, watched.loaded_us, watched.last_error) == (1, clock(), "")
    (loaded,) = events(logs, "toy.config_loaded")
    assert (loaded["source"], loaded["n"], loaded["sha256"]) == (str(path), 1, watched.sha256)

    clock.advance(5)
    path.write_text("n: 22\n")
    assert watched.check() is True
    assert (watched.current, watched.loaded_us) == (22, clock())
    assert watched.check() is False

    sha256 = watched.sha256
    for _ in range(2):
        path.write_text("\nn: x\n")
        assert watched.check() is False
    assert watched.current == 22
    assert watched.last_error == f"{path}:2: n: 'x' is a string, not an integer"
    (rejected,) = events(logs, "toy.config_rejected")  # said once
    assert (rejected["level"], rejected["sha256_in_force"]) == ("warning", sha256)

    path.write_text("n: 22\n")  # put back: the configuration in force, the error cleared
    assert watched.check() is False
    assert watched.last_error == ""

    path.write_text("n: 1\n" + "#" * 1000)
    assert watched.check() is False
    assert watched.last_error == f"{path}:1: (file): more than the 1000 bytes allowed"

    path.unlink()
    assert watched.check() is False
    assert watched.last_error == f"{path}: the file is missing; the last good toy settings stay in force"
    assert watched.current == 22


def test_a_file_replaced_by_rename_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text("n: 1\n")
    os.utime(path, ns=(10**18, 10**18))
    watched = toy(path)
    new = tmp_path / ".toy.tmp"
    new.write_text("n: 2\n")  # the same size and mtime: only the inode tells
    os.utime(new, ns=(10**18, 10**18))
    os.replace(new, path)
    assert watched.check() is True
    assert watched.current == 2


async def test_the_watch_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text("n: 1\n")
    watched = toy(path)
    task = asyncio.create_task(watched.watch(0.001))
    try:
        path.write_text("n: bad\n")
        await eventually(lambda: watched.last_error != "")
        path.write_text("n: 3\n")
        await eventually(lambda: watched.current == 3)
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class PublicationSpy(WatchedFile[int]):
    """Records what the rest of the state said at each moment a configuration was published (`_current`
    assigned): `check()` runs in a thread beside the event loop, whose readers may look at any moment."""

    seen: list[tuple[int, str, int]]

    @property
    def _current(self) -> int:
        return self._published

    @_current.setter
    def _current(self, config: int) -> None:
        if not hasattr(self, "seen"):
            self.seen = []
        self.seen.append((config, getattr(self, "last_error", ""), getattr(self, "loaded_us", -1)))
        self._published = config


def test_a_good_file_after_a_bad_one_is_published_with_its_error_already_cleared(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text("n: 1\n")
    clock = FakeClock()
    watched = PublicationSpy(
        path, parse_toy, clock, name="toy.config", what="toy settings", error=ToyError, describe=describe
    )
    path.write_text("n: x\n")
    assert watched.check() is False and watched.last_error != ""
    clock.advance(5)
    path.write_text("n: 7\n")
    assert watched.check() is True
    # a reader that sees the new configuration never sees the bad file's error, nor the old load time, beside it
    assert watched.seen[-1] == (7, "", clock())
