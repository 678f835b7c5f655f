"""`MonitorFile`: the configuration in force from its file, hot-reloaded by the kit's `WatchedFile` (a bad edit
keeps the last good configuration; `last_error` says why). The first load raises `ConfigError`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from services.monitor.core.config import ConfigError, MonitorConfig, parse_config
from tradeguard.reload import WatchedFile

__all__ = ["MonitorFile"]


def _describe(config: MonitorConfig) -> Mapping[str, Any]:
    return {
        "detectors": ",".join(
            name
            for name, on in (
                ("rate_spike", config.rate_spike.enabled),
                ("order_volume", config.order_volume.enabled),
                ("order_notional", config.order_notional.enabled),
                ("geography", config.geography.enabled),
                ("auth_failures", config.auth_failures.enabled),
                ("permission_scan", config.permission_scan.enabled),
                ("risk_rejections", config.risk_rejections.enabled),
            )
            if on
        )
    }


class MonitorFile(WatchedFile[MonitorConfig]):
    def __init__(self, path: Path, clock_us: Callable[[], int]) -> None:
        super().__init__(
            path,
            parse_config,
            clock_us,
            name="monitor.config",
            what="monitor configuration",
            error=ConfigError,
            describe=_describe,
        )
