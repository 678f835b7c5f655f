"""The counters in process: the embedded default (`make run` needs no Redis), for one service process.

The same arithmetic as the Redis script (window.py). Evaluations run one at a time on the event loop, so each is
atomic. Bounded: at most `max_counters` counters; when a new one would exceed that, counters whose windows have
emptied are dropped first (they hold nothing), then — the flood case — the new subject's evaluation is refused as
`StoreUnavailable`, so each limit's fail mode decides (never a silent forgetting of someone's counted units).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from services.ratelimit.counters import counter_key
from services.ratelimit.model import Counted, Evaluation, Limit, StoreUnavailable
from services.ratelimit.window import Window, evaluate

__all__ = ["DEFAULT_MAX_COUNTERS", "MemoryCounters"]

DEFAULT_MAX_COUNTERS: Final = 1_000_000


class MemoryCounters:
    def __init__(self, clock_us: Callable[[], int], *, max_counters: int = DEFAULT_MAX_COUNTERS) -> None:
        if max_counters < 1:
            raise ValueError("max_counters must be at least 1")
        self._clock_us = clock_us
        self.max_counters = max_counters
        self._windows: dict[str, tuple[Limit, Window]] = {}
        self.refused_full = 0  # evaluations refused because the table was full

    def __len__(self) -> int:
        return len(self._windows)

    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]:
        now = self._clock_us() if now_us is None else now_us
        return [self._one(evaluation, now) for evaluation in batch]

    def _one(self, evaluation: Evaluation, now_us: int) -> Counted | StoreUnavailable:
        keys = [counter_key(evaluation.subject, charge.limit) for charge in evaluation.charges]
        missing = sum(1 for key in set(keys) if key not in self._windows)
        if missing and len(self._windows) + missing > self.max_counters:
            self._sweep(now_us)
            if len(self._windows) + missing > self.max_counters:
                self.refused_full += 1
                return StoreUnavailable(f"in-process counters full ({self.max_counters})")
        windows = []
        for key, charge in zip(keys, evaluation.charges, strict=True):
            held = self._windows.get(key)
            if held is None:
                held = (charge.limit, Window())
                if evaluation.consume:
                    self._windows[key] = held
            windows.append(held[1])
        return evaluate(evaluation.charges, windows, now_us, consume=evaluation.consume)

    def _sweep(self, now_us: int) -> None:
        """Drop every counter whose window holds nothing any more."""
        for key, (limit, window) in list(self._windows.items()):
            window.prune(now_us // limit.bucket_us, limit.buckets)
            if window.empty:
                del self._windows[key]

    async def reset(self, subject: str, limits: Sequence[Limit]) -> int:
        cleared = 0
        for limit in limits:
            held = self._windows.pop(counter_key(subject, limit), None)
            if held is not None and not held[1].empty:
                cleared += 1
        return cleared

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        self._windows.clear()
