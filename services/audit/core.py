"""The audit log's core: events in, durable entries out, and the Merkle tree's state (pure: no grpc, no protobuf,
no database driver; the entry encoding and the event digest are injected — services/audit/codec.py — and the
store is an `AuditStore`).

`AuditLog(store, encode, digest, clock_us)`:

- `validate(event, field)`: `InvalidArgument` naming every bad field under `field` (e.g. "event", "events[3]"):
  `event_id` (required; `EVENT_ID_PATTERN`; not something that looks like a secret — a token, key or
  signature, see services/audit/masking.py `looks_secret`), `time` (required; from 2000-01-01 to one day past
  the log's clock), `outcome` (set), `latency` and the clock's errors (not negative), the lengths (each text
  field at most `MAX_TEXT_CHARS`, at most `MAX_DETAILS` details, names at most `MAX_NAME_CHARS`, values at most
  `MAX_VALUE_CHARS`: hard limits well above what masking keeps). Values are never echoed. A valid event costs
  one expression of all the checks; `violations(event, field)` runs them one by one (what `validate` raises).
- `append(events, recorder, fields=None)`: validates (every event, named as `fields[i]`, by default
  `events[i]`: the servicer leaves this check to the core, once per event), masks each event (`mask_event`:
  nothing secret is ever encoded), stamps the record time (the injected clock, never earlier than the previous stamp of this log),
  encodes the entry, hashes it (leaf hash SHA-256(0x00 ‖ bytes)) and digests the masked event — a `Pending`
  each — and hands the call's events, together, to ONE `tradeguard.batching.Batcher` in front of
  `store.append`: concurrent appends share one store transaction (group commit; a call's events are never split
  across transactions); the answer (`Appended` or `EventIdConflict` per event, in order) comes only after that
  transaction committed. If the store fails the batch as a whole, every caller of that batch gets the error and
  nothing of it is taken as done (the log's state is reloaded from the store before the next batch, in case the
  commit happened after all). Batcher errors (`BatcherFull`, `BatcherClosed`) reach the caller as they are.
- `size`, `root`: the committed tree's size and RFC 6962 root, kept current after every commit (the O(log n)
  right edge of complete-subtree hashes, loaded by `open()` from the store's nodes) and changed together, with
  no await between, so a reader sees a consistent pair.
- `wait_for(size)`: returns once the log holds at least `size` entries (woken after each commit; for Tail and
  the checkpoint publisher).
- `inclusion_proof`, `consistency_proof`, `root_at`: services/audit/tree.py over the store's nodes, for sizes up
  to `size` (`ValueError` beyond, or for arguments out of range).
- `close()`: refuses new appends and waits for those queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from services.audit import tree
from services.audit.masking import looks_secret, mask_event
from services.audit.model import (
    EVENT_ID_PATTERN,
    MAX_BATCH,
    TEXT_FIELDS,
    Appended,
    Entry,
    Event,
    Outcome,
    Pending,
)
from services.audit.store import AuditStore, EventIdConflict
from tradeguard.batching import Batcher
from tradeguard.batching import Outcome as BatchOutcome
from tradeguard.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_MAX_BATCH_CALLS",
    "MAX_DETAILS",
    "MAX_FUTURE_US",
    "MAX_NAME_CHARS",
    "MAX_TEXT_CHARS",
    "MAX_VALUE_CHARS",
    "MIN_TIME_US",
    "AuditLog",
]

MIN_TIME_US: Final = 946_684_800_000_000  # 2000-01-01T00:00:00Z
MAX_FUTURE_US: Final = 86_400_000_000  # an event's time at most a day past the log's clock
MAX_TEXT_CHARS: Final = 8192
MAX_DETAILS: Final = 1000
MAX_NAME_CHARS: Final = 1024
MAX_VALUE_CHARS: Final = 16384
DEFAULT_MAX_BATCH_CALLS: Final = 64  # append calls per transaction (each up to MAX_BATCH events)


Result = Appended | EventIdConflict


def _leaf_hash(entry_bytes: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry_bytes).digest()


def _detail_violations(details: Mapping[str, str], field: str) -> list[FieldViolation]:
    if len(details) > MAX_DETAILS:
        return [FieldViolation(f"{field}.details", f"at most {MAX_DETAILS} details, got {len(details)}")]
    violations = []
    if any(len(name) > MAX_NAME_CHARS for name in details):
        violations.append(
            FieldViolation(f"{field}.details", f"a name longer than {MAX_NAME_CHARS} characters")
        )
    if any(len(value) > MAX_VALUE_CHARS for value in details.values()):
        violations.append(
            FieldViolation(f"{field}.details", f"a value longer than {MAX_VALUE_CHARS} characters")
        )
    return violations


_text_values: Final = operator.attrgetter(*TEXT_FIELDS)


def _valid(event: Event, now_us: int) -> bool:
    """True when `AuditLog.validate` finds nothing wrong: every one of its checks, passed (the fast path; on
    False, `validate` runs its checks one by one to name every bad field)."""
    details = event.details
    return (
        MIN_TIME_US <= event.time_us <= now_us + MAX_FUTURE_US
        and event.outcome is not Outcome.UNSPECIFIED
        and event.latency_us >= 0
        and event.clock_estimated_error_us >= 0
        and event.clock_max_error_us >= 0
        and max(map(len, _text_values(event))) <= MAX_TEXT_CHARS
        and (not details or not _detail_violations(details, ""))
        and EVENT_ID_PATTERN.fullmatch(event.event_id) is not None
        and not looks_secret(event.event_id)
    )


class AuditLog:
    """Appends masked events durably in group commits and keeps the tree's size and root (see the module)."""

    def __init__(
        self,
        store: AuditStore,
        encode: Callable[[Entry], bytes],
        digest: Callable[[Event], bytes],
        clock_us: Callable[[], int],
        *,
        max_batch_calls: int = DEFAULT_MAX_BATCH_CALLS,
        max_pending_calls: int = 65_536,
    ) -> None:
        self._store = store
        self._encode = encode
        self._digest = digest
        self._clock_us = clock_us
        self._batcher: Batcher[list[Pending], list[Result]] = Batcher(
            self._run_batch, max_batch=max_batch_calls, max_pending=max_pending_calls, name="audit.append"
        )
        self._edge: list[
            tuple[int, bytes]
        ] = []  # the right edge: (level, hash) of complete subtrees, left first
        self._last_record_us = 0
        self._stale = False
        self._grown = asyncio.Event()
        self.size = 0
        self.root = tree.EMPTY_ROOT

    @property
    def batcher(self) -> Batcher[list[Pending], list[Result]]:
        """The group commit's batcher (its counters: `batches` = store transactions, `items` = append calls)."""
        return self._batcher

    # --- state ----------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the committed tree's size and root from the store."""
        await self._load()

    async def _load(self) -> None:
        size = await self._store.size()
        keys = tree.subtree_keys(0, size)
        hashes = await self._store.nodes(keys) if keys else []
        if len(hashes) != len(keys):
            raise ValueError(f"the store answered {len(hashes)} nodes for {len(keys)} keys")
        self._edge = [(level, value) for (level, _), value in zip(keys, hashes, strict=True)]
        self._stale = False
        self._grew(size)

    def _edge_root(self) -> bytes:
        if not self._edge:
            return tree.EMPTY_ROOT
        value = self._edge[-1][1]
        for _, left in reversed(self._edge[:-1]):
            value = tree.node_hash(left, value)
        return value

    def _extend(self, leaf_hash: bytes) -> None:
        level, value = 0, leaf_hash
        while self._edge and self._edge[-1][0] == level:
            _, left = self._edge.pop()
            level, value = level + 1, tree.node_hash(left, value)
        self._edge.append((level, value))

    def _grew(self, size: int) -> None:
        """Publish a new size and root together (no await in between), then wake the waiters."""
        self.size, self.root = size, self._edge_root()
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()

    async def wait_for(self, size: int) -> None:
        """Return once the log holds at least `size` entries."""
        while self.size < size:
            await self._grown.wait()

    # --- appending ------------------------------------------------------------------------------------------

    def validate(self, event: Event, field: str) -> None:
        """`InvalidArgument` naming every bad field of `event` under `field` (see the module). The fast path: one
        expression of all the checks; only when it fails are they run one by one (`violations`) to name them."""
        if _valid(event, self._clock_us()):
            return
        violations = self.violations(event, field)
        if violations:
            raise InvalidArgument(violations)

    def violations(self, event: Event, field: str) -> list[FieldViolation]:
        """Every bad field of `event` under `field`, check by check (what `validate` raises)."""
        violations = []
        if not event.event_id:
            violations.append(FieldViolation(f"{field}.event_id", "required"))
        elif EVENT_ID_PATTERN.fullmatch(event.event_id) is None:
            violations.append(FieldViolation(f"{field}.event_id", "1-128 characters of A-Z a-z 0-9 _ . : -"))
        elif looks_secret(event.event_id):
            violations.append(
                FieldViolation(
                    f"{field}.event_id", "looks like a token, key or signature: use an opaque id (a UUID)"
                )
            )
        if not event.time_us:
            violations.append(FieldViolation(f"{field}.time", "required"))
        elif not MIN_TIME_US <= event.time_us <= self._clock_us() + MAX_FUTURE_US:
            violations.append(
                FieldViolation(f"{field}.time", "from 2000-01-01 to a day past the audit log's clock")
            )
        if event.outcome is Outcome.UNSPECIFIED:
            violations.append(FieldViolation(f"{field}.outcome", "required"))
        if event.latency_us < 0:
            violations.append(FieldViolation(f"{field}.latency", "not negative"))
        if event.clock_estimated_error_us < 0:
            violations.append(FieldViolation(f"{field}.clock.estimated_error_us", "not negative"))
        if event.clock_max_error_us < 0:
            violations.append(FieldViolation(f"{field}.clock.max_error_us", "not negative"))
        for name in TEXT_FIELDS:
            if len(getattr(event, name)) > MAX_TEXT_CHARS:
                violations.append(FieldViolation(f"{field}.{name}", f"at most {MAX_TEXT_CHARS} characters"))
        violations += _detail_violations(event.details, field)
        return violations

    def _pending(self, event: Event, recorder: str, record_us: int) -> Pending:
        masked = mask_event(event)
        entry = Entry(record_time_us=record_us, recorder=recorder, event=masked)
        entry_bytes = self._encode(entry)
        return Pending(entry, entry_bytes, _leaf_hash(entry_bytes), self._digest(masked))

    async def append(
        self, events: Sequence[Event], recorder: str, fields: Sequence[str] | None = None
    ) -> list[Result]:
        """Append `events` (one transaction, shared with concurrent calls); answered once durable. Each event is
        validated first, named by `fields` (default `events[i]`), and none is appended if any is bad."""
        if not recorder:
            raise ValueError("an entry needs its recorder")
        if not events:
            return []
        if len(events) > MAX_BATCH:
            raise InvalidArgument.field("events", f"at most {MAX_BATCH} events, got {len(events)}")
        if fields is not None and len(fields) != len(events):
            raise ValueError(f"{len(fields)} field names for {len(events)} events")
        now_us = self._clock_us()
        if not all(_valid(event, now_us) for event in events):
            violations: list[FieldViolation] = []
            for index, event in enumerate(events):
                violations += self.violations(event, f"events[{index}]" if fields is None else fields[index])
            if violations:
                raise InvalidArgument(violations)
        record_us = self._last_record_us = max(self._last_record_us, now_us)
        batch = [self._pending(event, recorder, record_us) for event in events]
        return await self._batcher.submit(batch)

    async def _run_batch(self, calls: Sequence[list[Pending]]) -> list[BatchOutcome[list[Result]]]:
        if self._stale:
            await self._load()
        flat = [pending for call in calls for pending in call]
        try:
            results = await self._store.append(flat)
        except BaseException:
            self._stale = True  # the commit may have happened all the same: reload before the next batch
            raise
        if len(results) != len(flat):
            self._stale = True
            raise RuntimeError(f"the store answered {len(results)} results for {len(flat)} entries")
        if not self._committed(results):
            try:  # not the next sequence numbers: the store knows better
                await self._load()
            except Exception:
                self._stale = True  # reloaded before the next batch; these entries are committed all the same
        outcomes: list[BatchOutcome[list[Result]]] = []
        start = 0
        for call in calls:
            outcomes.append(BatchOutcome.ok(list(results[start : start + len(call)])))
            start += len(call)
        return outcomes

    def _committed(self, results: Sequence[Result]) -> bool:
        """Extend the tree by the entries created; False if they are not the next sequence numbers."""
        created = sorted((r.sequence, r.leaf_hash) for r in results if isinstance(r, Appended) and r.created)
        if [sequence for sequence, _ in created] != list(range(self.size, self.size + len(created))):
            return False
        for _, leaf_hash in created:
            self._extend(leaf_hash)
        if created:
            self._grew(self.size + len(created))
        return True

    async def close(self) -> None:
        """Refuse new appends; wait for those queued."""
        await self._batcher.close()

    # --- proofs ---------------------------------------------------------------------------------------------

    def _check_size(self, size: int) -> None:
        if size > self.size:
            raise ValueError(f"the log has {self.size} entries, not {size}")

    async def root_at(self, size: int) -> bytes:
        """The root of the tree of the first `size` entries."""
        self._check_size(size)
        return await tree.root_at(size, self._store.nodes)

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The audit path of entry `index` in the tree of `size` entries."""
        self._check_size(size)
        return await tree.inclusion_proof(index, size, self._store.nodes)

    async def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """The proof that the tree of `size2` entries extends the tree of `size1`."""
        self._check_size(size2)
        return await tree.consistency_proof(size1, size2, self._store.nodes)
