"""The limits file in force, hot-reloaded by the kit's watcher (tradeguard/reload.py): a bad or missing file never
replaces good limits.

`LimitsFile(path, clock_us)` loads the file at once and raises `LimitsError` if it cannot (the service refuses to
start on a missing or invalid file). `check()` re-reads it when it changed and swaps `current` in one assignment;
a file that fails keeps the last good limits, `last_error` says why, and the failure is logged once
(`ratelimit.limits_rejected`, warning); a success logs `ratelimit.limits_loaded` (source, sha256, tiers).
`watch(interval_s)` runs `check()` off the event loop every `interval_s` forever. The rules of change detection
(stamp, rename, racy reads, same content) are the kit's, stated in tradeguard/reload.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from services.ratelimit.limits_file import MAX_BYTES, LimitsError, parse_limits
from services.ratelimit.model import LimitsConfig
from tradeguard.reload import RACY_NS, WatchedFile

__all__ = ["RACY_NS", "LimitsFile"]


def _describe(config: LimitsConfig) -> Mapping[str, Any]:
    return {"tiers": sorted(config.tiers)}


class LimitsFile(WatchedFile[LimitsConfig]):
    """The limits in force from `path` (see the module)."""

    def __init__(self, path: Path, clock_us: Callable[[], int]) -> None:
        super().__init__(
            path,
            parse_limits,
            clock_us,
            name="ratelimit.limits",
            what="limits",
            error=LimitsError,
            describe=_describe,
            max_bytes=MAX_BYTES,
        )
