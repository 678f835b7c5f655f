"""`Bounded`: at most `limit` entries, the least recently seen forgotten (reads count as seen), resizable."""

from __future__ import annotations

import pytest

from services.monitor.core.lru import Bounded


def test_the_least_recently_seen_is_forgotten() -> None:
    memory: Bounded[str, int] = Bounded(2)
    memory.put("a", 1)
    memory.put("b", 2)
    assert memory.get("a") == 1  # a seen: b is now the oldest
    memory.put("c", 3)
    assert list(memory) == ["a", "c"] and memory.evicted == 1
    assert memory.setdefault("d", lambda: 4) == 4 and "a" not in memory
    memory.resize(1)
    assert list(memory) == ["d"] and len(memory) == 1


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Bounded(0)
