"""The limits file in force, hot-reloaded: a bad or missing file never replaces good limits.

`LimitsFile(path, clock_us)` loads the file at once and raises `LimitsError` if it cannot (the service refuses to
start on a missing or invalid file). `check()` re-reads it when it changed and swaps `current` in one assignment
(readers see the old config or the new one, never a mix):

- changed means a different `(st_mtime_ns, st_ctime_ns, st_size, st_ino, st_dev)` — so a file replaced by rename
  (an editor's atomic save, a Kubernetes ConfigMap's symlink swap) is seen as well as one written in place — or
  a file whose last read was "racy" (modified within `RACY_NS` of being read: a same-size rewrite within the
  file system's timestamp granularity leaves the stat unchanged, so such a file is read again until it settles);
- a changed file whose content hash is the one in force swaps nothing;
- a file that fails (parse error, unreadable, deleted) keeps the last good limits; `last_error` says why, and the
  failure is logged once (`ratelimit.limits_rejected`, warning) however many times it is seen again; a success
  clears `last_error` and logs `ratelimit.limits_loaded` (source, sha256, tiers).

`watch(interval_s)` runs `check()` in a worker thread every `interval_s` forever (the file read and the parse stay
off the event loop); nothing a check raises stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from services.ratelimit.limits_file import MAX_BYTES, LimitsError, parse_limits
from services.ratelimit.model import LimitsConfig
from tradeguard.observability.logging import get_logger

__all__ = ["RACY_NS", "LimitsFile"]

RACY_NS: Final = 2_000_000_000  # a file modified this close to its read is read again at the next check

_log = get_logger("ratelimit.limits")

_Stamp = tuple[int, int, int, int, int]


def _stamp(stat: os.stat_result) -> _Stamp:
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino, stat.st_dev)


class LimitsFile:
    """The limits in force from `path` (see the module)."""

    def __init__(self, path: Path, clock_us: Callable[[], int]) -> None:
        self.path = path
        self._clock_us = clock_us
        self._lock = threading.Lock()
        try:
            stamp, data, racy = self._read()
        except OSError as error:
            raise LimitsError(f"{path}: cannot read the limits file: {error.strerror or error}") from None
        config = self._parse(data)
        self._current = config
        self._stamp: _Stamp | None = stamp
        self._racy = racy
        self.loaded_us = clock_us()
        self.last_error = ""
        self._logged_error = ""
        self._log_loaded(config)

    @property
    def current(self) -> LimitsConfig:
        return self._current

    def check(self) -> bool:
        """Re-read the file if it changed; True if new limits are now in force."""
        with self._lock:
            try:
                stat = os.stat(self.path)
                if _stamp(stat) == self._stamp and not self._racy:
                    return False
                stamp, data, racy = self._read()
            except FileNotFoundError:
                self._stamp = None
                self._failed(f"{self.path}: the file is missing; the last good limits stay in force")
                return False
            except (OSError, LimitsError) as error:
                self._stamp = None
                self._failed(str(error))
                return False
            self._stamp, self._racy = stamp, racy
            if hashlib.sha256(data).hexdigest() == self._current.sha256:
                self._recovered()
                return False
            try:
                config = self._parse(data)
            except LimitsError as error:
                self._failed(str(error))
                return False
            self._current = config
            self.loaded_us = self._clock_us()
            self._recovered()
            self._log_loaded(config)
            return True

    async def watch(self, interval_s: float) -> None:
        """`check()` every `interval_s`, forever (cancel the task to stop it)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception as error:  # a check never kills the watch
                _log.error("ratelimit.limits_check_failed", source=str(self.path), error=repr(error))

    def _read(self) -> tuple[_Stamp, bytes, bool]:
        """The file's stamp, bytes (at most MAX_BYTES + 1) and whether it was read racily; the stamp is taken
        before the read, so a write during the read makes the next check read again."""
        with open(self.path, "rb") as file:
            stat = os.fstat(file.fileno())
            data = file.read(MAX_BYTES + 1)
        racy = time.time_ns() - stat.st_mtime_ns < RACY_NS
        return _stamp(stat), data, racy

    def _parse(self, data: bytes) -> LimitsConfig:
        source = str(self.path)
        if len(data) > MAX_BYTES:
            raise LimitsError(f"{source}:1: (file): more than the {MAX_BYTES} bytes allowed")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise LimitsError(f"{source}:{line}: (file): not UTF-8 text") from None
        return parse_limits(text, source)

    def _failed(self, error: str) -> None:
        self.last_error = error
        if error != self._logged_error:
            self._logged_error = error
            _log.warning(
                "ratelimit.limits_rejected",
                source=str(self.path),
                error=error,
                sha256_in_force=self._current.sha256,
            )

    def _recovered(self) -> None:
        self.last_error = ""
        self._logged_error = ""

    def _log_loaded(self, config: LimitsConfig) -> None:
        _log.info(
            "ratelimit.limits_loaded", source=config.source, sha256=config.sha256, tiers=sorted(config.tiers)
        )
