"""`Budget`: at most `per_minute[kind]` actions of each kind in any 60 s (a sliding log of the last ones' times,
so at most `per_minute` times per kind are kept). An action beyond it is not carried out (SUPPRESSED: its alert
stands and says so), so a flood of findings cannot turn into a storm of revocations or kill switches."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Final

from services.monitor.model import ActionKind

__all__ = ["WINDOW_US", "Budget"]

WINDOW_US: Final = 60_000_000


class Budget:
    def __init__(self, per_minute: Mapping[ActionKind, int]) -> None:
        self.per_minute = dict(per_minute)
        self._times: dict[ActionKind, deque[int]] = {}

    def configure(self, per_minute: Mapping[ActionKind, int]) -> None:
        self.per_minute = dict(per_minute)

    def take(self, kind: ActionKind, now_us: int) -> bool:
        """True (and the action counted) when one more action of `kind` fits in the last minute at `now_us`."""
        limit = self.per_minute.get(kind, 0)
        times = self._times.setdefault(kind, deque())
        while times and times[0] <= now_us - WINDOW_US:
            times.popleft()
        if len(times) >= limit:
            return False
        times.append(now_us)
        return True
