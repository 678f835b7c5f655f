"""`Bounded`: a map that remembers at most `limit` entries; adding one more forgets the LEAST RECENTLY SEEN one
(`get` and `put` count as seen). Every per-subject memory of the detectors is one of these, so a flood of distinct
keys, accounts or addresses costs at most `limit` entries per map, never more. `evicted` counts forgotten ones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["Bounded", "ByKind", "PerSubject"]

K = TypeVar("K")
V = TypeVar("V")


class _Bounds(Protocol):
    @property
    def max_subjects(self) -> int: ...


C = TypeVar("C", bound=_Bounds)


class Bounded(Generic[K, V]):
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a bounded map holds at least one entry")
        self.limit = limit
        self.evicted = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        """The entry of `key`, made by `make()` (and the least recently seen one forgotten if full) when absent."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self.resize(self.limit)

    def resize(self, limit: int) -> None:
        """Change the bound (a configuration reload); the least recently seen entries beyond it are forgotten."""
        self.limit = max(1, limit)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
            self.evicted += 1


class ByKind(Generic[V]):
    """A detector's memory of subjects: one `Bounded` map per subject kind (key, account, address...), each with
    the same bound; `resize` changes them all (a configuration reload); `len` is the subjects remembered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._maps: dict[str, Bounded[str, V]] = {}

    def of(self, kind: str) -> Bounded[str, V]:
        memory = self._maps.get(kind)
        if memory is None:
            memory = self._maps[kind] = Bounded(self.limit)
        return memory

    def resize(self, limit: int) -> None:
        self.limit = limit
        for memory in self._maps.values():
            memory.resize(limit)

    def __len__(self) -> int:
        return sum(len(memory) for memory in self._maps.values())


class PerSubject(Generic[C, V]):
    """What the per-subject detectors share (rate spikes, order spikes, bursts): their configuration, their memory
    of subjects by kind (`max_subjects` each, resized when the configuration is reloaded) and their alert count."""

    def __init__(self, config: C) -> None:
        self.config = config
        self._subjects: ByKind[V] = ByKind(config.max_subjects)
        self.alerts = 0

    def configure(self, config: C) -> None:
        self.config = config
        self._subjects.resize(config.max_subjects)

    def tracked(self) -> int:
        return len(self._subjects)
