"""A configuration file in force, hot-reloaded: a bad or missing file never replaces a good configuration.

`WatchedFile(path, parse, clock_us, ...)` loads the file at once and raises the format's error (`error`, a
`YamlError` subclass) if it cannot: a service refuses to start on a missing or invalid file. `parse(text, source)`
is the format's parser (the text decoded by `tradeguard.yamlfile.decode`: at most `max_bytes`, UTF-8). `check()`
re-reads the file when it changed and swaps `current` in one assignment (readers see the old configuration or the
new one, never a mix):

- changed means a different `(st_mtime_ns, st_ctime_ns, st_size, st_ino, st_dev)` — so a file replaced by rename
  (an editor's atomic save, a Kubernetes ConfigMap's symlink swap) is seen as well as one written in place — or
  a file whose last read was "racy" (modified within `RACY_NS` of being read: a same-size rewrite within the
  file system's timestamp granularity leaves the stat unchanged, so such a file is read again until it settles);
- a changed file whose bytes hash (`sha256`) to the ones in force swaps nothing;
- a file that fails (parse error, unreadable, deleted) keeps the last good configuration; `last_error` says why,
  and the failure is logged once (`<name>_rejected`, warning) however many times it is seen again; a success
  clears `last_error` and logs `<name>_loaded` (source, sha256, and what `describe(config)` adds).

The log events are `<name>_loaded`, `<name>_rejected` and `<name>_check_failed` (`name` such as
"ratelimit.limits" or "risk.limits"); `what` names the file in messages ("limits" → "cannot read the limits
file", "the last good limits stay in force").

`watch(interval_s)` runs `check()` in a worker thread every `interval_s` forever (the file read and the parse stay
off the event loop); nothing a check raises stops it. `check()` holds a lock: concurrent checks are serialised.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from tradeguard.observability.logging import get_logger
from tradeguard.yamlfile import MAX_BYTES, YamlError, decode

__all__ = ["RACY_NS", "WatchedFile"]

RACY_NS: Final = 2_000_000_000  # a file modified this close to its read is read again at the next check

T = TypeVar("T")

_Stamp = tuple[int, int, int, int, int]


def _stamp(stat: os.stat_result) -> _Stamp:
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino, stat.st_dev)


def _nothing(config: Any) -> Mapping[str, Any]:
    return {}


class WatchedFile(Generic[T]):
    """The configuration in force from `path` (see the module)."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[str, str], T],
        clock_us: Callable[[], int],
        *,
        name: str,
        what: str,
        error: type[YamlError] = YamlError,
        describe: Callable[[T], Mapping[str, Any]] = _nothing,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.path = path
        self._parse_text = parse
        self._clock_us = clock_us
        self._name = name
        self._what = what
        self._error = error
        self._describe = describe
        self._max_bytes = max_bytes
        self._log = get_logger(name)
        self._lock = threading.Lock()
        try:
            stamp, data, racy = self._read()
        except OSError as problem:
            raise error(f"{path}: cannot read the {what} file: {problem.strerror or problem}") from None
        config = self._parse(data)
        self._current = config
        self._sha256 = hashlib.sha256(data).hexdigest()
        self._stamp: _Stamp | None = stamp
        self._racy = racy
        self.loaded_us = clock_us()
        self.last_error = ""
        self._logged_error = ""
        self._log_loaded(config)

    @property
    def current(self) -> T:
        return self._current

    @property
    def sha256(self) -> str:
        """The SHA-256 (hex) of the bytes of the configuration in force."""
        return self._sha256

    def check(self) -> bool:
        """Re-read the file if it changed; True if a new configuration is now in force."""
        with self._lock:
            try:
                stat = os.stat(self.path)
                if _stamp(stat) == self._stamp and not self._racy:
                    return False
                stamp, data, racy = self._read()
            except FileNotFoundError:
                self._stamp = None
                self._failed(f"{self.path}: the file is missing; the last good {self._what} stay in force")
                return False
            except (OSError, YamlError) as problem:
                self._stamp = None
                self._failed(str(problem))
                return False
            self._stamp, self._racy = stamp, racy
            sha256 = hashlib.sha256(data).hexdigest()
            if sha256 == self._sha256:
                self._recovered()
                return False
            try:
                config = self._parse(data)
            except YamlError as problem:
                self._failed(str(problem))
                return False
            # this runs in a thread beside the event loop: the error cleared and the time stamped BEFORE the new
            # configuration is published, so a reader that sees the new `sha256` or `current` never sees the old
            # file's error beside it
            self.loaded_us = self._clock_us()
            self._recovered()
            self._current, self._sha256 = config, sha256
            self._log_loaded(config)
            return True

    async def watch(self, interval_s: float) -> None:
        """`check()` every `interval_s`, forever (cancel the task to stop it)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception as problem:  # a check never kills the watch
                self._log.error(f"{self._name}_check_failed", source=str(self.path), error=repr(problem))

    def _read(self) -> tuple[_Stamp, bytes, bool]:
        """The file's stamp, bytes (at most max_bytes + 1) and whether it was read racily; the stamp is taken
        before the read, so a write during the read makes the next check read again."""
        with open(self.path, "rb") as file:
            stat = os.fstat(file.fileno())
            data = file.read(self._max_bytes + 1)
        racy = time.time_ns() - stat.st_mtime_ns < RACY_NS
        return _stamp(stat), data, racy

    def _parse(self, data: bytes) -> T:
        source = str(self.path)
        return self._parse_text(decode(data, source, self._error, self._max_bytes), source)

    def _failed(self, error: str) -> None:
        self.last_error = error
        if error != self._logged_error:
            self._logged_error = error
            self._log.warning(
                f"{self._name}_rejected", source=str(self.path), error=error, sha256_in_force=self._sha256
            )

    def _recovered(self) -> None:
        self.last_error = ""
        self._logged_error = ""

    def _log_loaded(self, config: T) -> None:
        self._log.info(
            f"{self._name}_loaded", source=str(self.path), sha256=self._sha256, **self._describe(config)
        )
