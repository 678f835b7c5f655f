"""The auth service's hot state in process (the embedded default: one replica, nothing else to run).

Every method runs to its end without awaiting, so each is atomic on the event loop. Time is the injected clock
(microseconds, `tradeguard.storage.clock_us` in production, a `FakeClock` in tests): an entry lives while
`now < its expiry`, and an expired entry is never seen again.

**The bound.** Each of the six maps — nonces, TOTP steps, failure windows, locks, challenges, revocations — holds
at most `max_entries` entries, and each failure window at most `max_failures_per_subject` failure times (the count
then saturates at that number, far above any lockout threshold). Every write also removes up to two expired
entries, so a map holds about its live entries. When a map is full, a new entry first evicts the expired
entries, and if none has expired, the oldest entry (least recently written). Evicting a live entry is
counted in `evictions` and is the price of the bound: a live nonce evicted could be replayed — but the oldest nonce
is the one closest to leaving the signed-request window, where the timestamp check refuses it anyway; an evicted
failure window or lock forgets a count (it saturates the other way: an attacker flooding distinct subjects cannot
grow memory, only age out the oldest counts); an evicted revocation is no longer served to a guard that
(re)connects after the eviction (size `max_entries` above the revocations live at once). Memory is therefore
O(6 * max_entries + max_entries * max_failures_per_subject) entries.

**Revocation sequences** start at the clock's microseconds at the first publication and then go up by one, so a
restarted process never reuses a sequence a guard has already seen (a guard resuming after 500 still gets the new
ones; this holds while fewer than one revocation per microsecond is published), and are gap-free within one
store's life.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from services.auth.model import Revocation, RevocationKind

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_MAX_FAILURES_PER_SUBJECT", "MemoryHotState"]

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_FAILURES_PER_SUBJECT = 1000
_SWEEP = 2  # expired entries removed per write: more than the one a write adds, so expired ones never pile up


class ExpiringMap(Generic[K, V]):
    """A map of entries with an expiry time, at most `capacity` of them (see the module for what is evicted).

    Kept in write order (an OrderedDict: the first entry is the oldest) beside a heap of (expiry, serial, key) so
    that the expired entries are found in O(log n) each; heap entries of overwritten or removed keys are skipped
    when met and the heap is rebuilt when it grows past twice the map."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a map needs room for at least one entry")
        self.capacity = capacity
        self.evictions = 0  # live entries evicted to stay within the capacity
        self._items: OrderedDict[K, tuple[int, int, V]] = OrderedDict()  # key -> (expiry, serial, value)
        self._heap: list[tuple[int, int, K]] = []
        self._serial = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, now_us: int) -> V | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry[0] <= now_us:
            del self._items[key]
            return None
        return entry[2]

    def expiry(self, key: K, now_us: int) -> int | None:
        entry = self._items.get(key)
        return None if entry is None or entry[0] <= now_us else entry[0]

    def put(self, key: K, value: V, expire_us: int, now_us: int) -> None:
        """Write `key` (it becomes the newest entry), evicting first if a new key finds the map full. Each write
        also removes up to `_SWEEP` expired entries, so that under a steady flow the map holds about its live
        entries rather than filling up to `capacity` with expired ones (memory: a busy auth service's nonce map
        stays near rate x window instead of growing to the bound)."""
        self._sweep(now_us)
        if key in self._items:
            del self._items[key]
        elif len(self._items) >= self.capacity:
            self._make_room(now_us)
        self._serial += 1
        self._items[key] = (expire_us, self._serial, value)
        heapq.heappush(self._heap, (expire_us, self._serial, key))
        if len(self._heap) > 2 * len(self._items) + 64:
            self._heap = [(expiry, serial, k) for k, (expiry, serial, _) in self._items.items()]
            heapq.heapify(self._heap)

    def pop(self, key: K, now_us: int) -> V | None:
        entry = self._items.pop(key, None)
        return None if entry is None or entry[0] <= now_us else entry[2]

    def newest_first(self, now_us: int) -> Iterator[tuple[K, V]]:
        """The live entries, newest first (stop early to read only the newest)."""
        for key in reversed(self._items):
            expiry, _, value = self._items[key]
            if expiry > now_us:
                yield key, value

    def _sweep(self, now_us: int) -> None:
        heap, items = self._heap, self._items
        for _ in range(_SWEEP):
            if not heap or heap[0][0] > now_us:
                return
            _, serial, key = heapq.heappop(heap)
            entry = items.get(key)
            if entry is not None and entry[1] == serial:
                del items[key]  # expired (a heap entry of a key written again since is just dropped)

    def _make_room(self, now_us: int) -> None:
        heap, items = self._heap, self._items
        while heap and len(items) >= self.capacity:
            expiry, serial, key = heap[0]
            entry = items.get(key)
            if entry is not None and entry[1] == serial and expiry > now_us:
                break  # the earliest expiry is still live: nothing has expired
            heapq.heappop(heap)
            if entry is not None and entry[1] == serial:
                del items[key]  # expired
        while len(items) >= self.capacity:
            items.popitem(last=False)  # the oldest live entry
            self.evictions += 1


class MemoryHotState:
    """`HotState` in process (see the module: atomicity, the clock, the bound and its eviction rule)."""

    def __init__(
        self,
        clock: Callable[[], int],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_failures_per_subject: int = DEFAULT_MAX_FAILURES_PER_SUBJECT,
    ) -> None:
        if max_failures_per_subject < 1:
            raise ValueError("max_failures_per_subject must be at least 1")
        self._clock = clock
        self.max_failures_per_subject = max_failures_per_subject
        self._nonces: ExpiringMap[tuple[str, str], bool] = ExpiringMap(max_entries)
        self._totp: ExpiringMap[str, int] = ExpiringMap(max_entries)
        self._failures: ExpiringMap[str, deque[int]] = ExpiringMap(max_entries)
        self._locks: ExpiringMap[str, int] = ExpiringMap(max_entries)
        self._challenges: ExpiringMap[str, str] = ExpiringMap(max_entries)
        self._revocations: ExpiringMap[int, Revocation] = ExpiringMap(max_entries)
        self._last_sequence: int | None = None
        self._published: asyncio.Event | None = None
        self._waiting = 0
        self._closed = False

    def sizes(self) -> dict[str, int]:
        """Entries held now per map (expired ones included until they are met or evicted)."""
        return {
            "nonces": len(self._nonces),
            "totp": len(self._totp),
            "failures": len(self._failures),
            "locks": len(self._locks),
            "challenges": len(self._challenges),
            "revocations": len(self._revocations),
        }

    @property
    def waiting(self) -> int:
        """Callers of `revocations_after` waiting now for a publication."""
        return self._waiting

    @property
    def evictions(self) -> int:
        """Live entries evicted so far to keep the bound (all maps)."""
        maps = (self._nonces, self._totp, self._failures, self._locks, self._challenges, self._revocations)
        return sum(m.evictions for m in maps)

    def _now(self) -> int:
        if self._closed:
            raise RuntimeError("the hot state is closed")
        return self._clock()

    async def claim_nonce(self, key_id: str, nonce: str, ttl_us: int) -> bool:
        _positive(ttl_us)
        now = self._now()
        if self._nonces.get((key_id, nonce), now) is not None:
            return False
        self._nonces.put((key_id, nonce), True, now + ttl_us, now)
        return True

    async def advance_totp_step(self, user_id: str, step: int, ttl_us: int) -> bool:
        _positive(ttl_us)
        now = self._now()
        last = self._totp.get(user_id, now)
        if last is not None and step <= last:
            return False
        self._totp.put(user_id, step, now + ttl_us, now)
        return True

    async def count_failure(self, subject: str, window_us: int) -> int:
        _positive(window_us)
        now = self._now()
        times = self._failures.get(subject, now)
        if times is None:
            times = deque()
        while times and times[0] <= now - window_us:
            times.popleft()
        times.append(now)
        while len(times) > self.max_failures_per_subject:
            times.popleft()
        expiry = max(now + window_us, self._failures.expiry(subject, now) or 0)
        self._failures.put(subject, times, expiry, now)
        return len(times)

    async def clear_failures(self, subject: str) -> None:
        self._failures.pop(subject, self._now())

    async def lock(self, subject: str, until_us: int) -> None:
        now = self._now()
        current = self._locks.get(subject, now)
        if until_us <= now or (current is not None and current >= until_us):
            return
        self._locks.put(subject, until_us, until_us, now)

    async def locked_until(self, subject: str, now_us: int) -> int | None:
        until = self._locks.get(subject, self._now())
        return until if until is not None and until > now_us else None

    async def unlock(self, subject: str) -> None:
        self._locks.pop(subject, self._now())

    async def put_challenge(self, challenge_hash: str, user_id: str, ttl_us: int) -> None:
        _positive(ttl_us)
        now = self._now()
        self._challenges.put(challenge_hash, user_id, now + ttl_us, now)

    async def take_challenge(self, challenge_hash: str) -> str | None:
        return self._challenges.pop(challenge_hash, self._now())

    async def publish_revocation(
        self, kind: RevocationKind, value: str, revoke_time_us: int, expire_time_us: int
    ) -> Revocation:
        now = self._now()
        sequence = now if self._last_sequence is None else self._last_sequence + 1
        self._last_sequence = sequence
        revocation = Revocation(sequence, RevocationKind(kind), value, revoke_time_us, expire_time_us)
        # Live while now <= expire_time_us ("after this the revocation no longer matters").
        self._revocations.put(sequence, revocation, expire_time_us + 1, now)
        if self._published is not None:
            self._published.set()
            self._published = None
        return revocation

    def _after(self, sequence: int) -> builtins.list[Revocation]:
        found: list[Revocation] = []
        for seq, revocation in self._revocations.newest_first(self._now()):
            if seq <= sequence:
                break
            found.append(revocation)
        found.reverse()
        return found

    async def revocations_after(self, sequence: int, wait_s: float = 0.0) -> builtins.list[Revocation]:
        found = self._after(sequence)
        if found or wait_s <= 0:
            return found
        self._waiting += 1
        try:
            async with asyncio.timeout(wait_s):
                while not found:
                    if self._published is None:
                        self._published = asyncio.Event()
                    await self._published.wait()
                    found = self._after(sequence)
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1
        return found

    async def close(self) -> None:
        self._closed = True
        if self._published is not None:  # wake the waiters: their next read refuses
            self._published.set()
            self._published = None


def _positive(ttl_us: int) -> None:
    if ttl_us <= 0:
        raise ValueError(f"a time to live must be positive, not {ttl_us} µs")
