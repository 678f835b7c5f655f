"""Retention: entries older than the retention period are archived to segment files, then removed from the
database — never before their period, never before they are archived.

`Retention(store, archive_dir, days, interval_s, clock_us)`; `run()` is the audit service's background task: a
pass (`run_once`) at start and then every `interval_s`; a failing pass is logged (its error's type and message:
a store's, never an entry) and retried at the next interval; it never ends the task nor the service.

A pass:
1. records the configured period (`store.record_retention`): the database keeps the LONGEST period ever
   recorded and its DELETE trigger uses that one, so a shorter configured period changes nothing — it is logged
   (a warning, once) and the longer one is used here too (not refused: the audit service is on every guarded
   call's path, and a shorter setting could never take effect anyway);
2. takes the latest signed checkpoint: only entries it covers are archived (an entry no signature covers is
   never removed); none: nothing to do;
3. repeatedly takes the next segment, at most `segment_limit` entries (memory stays bounded): the stored
   entries from the first one stored (which must be `store.pruned()`, the end of the archived prefix: else the
   log has a hole, and nothing is removed) whose RECORD time is before now (the injected clock) minus the period
   (`store.expired`); writes it as a segment file (tradeguard/audit/archive.py: the entries' sequence numbers,
   their exact stored bytes in base64 and leaf hashes, the compact range before and after them, and the covering
   checkpoint) atomically (tradeguard.files.atomic_write: a temporary file, fsync, rename, fsync of the
   directory; the file 0600, the directory 0700); and only then `store.prune`: the `archives` row with the file's
   SHA-256 and the deletes, in one transaction. A prune that fails removes its file again; a crash between the
   file and the transaction leaves one that the next pass removes before it writes (a file from the archived
   prefix's end on is never recorded). One retention task per database (the service's): two racing would
   disagree about those files.

The database checks the rule again (its own clock; the archive recorded), so a wrong clock here or a bug cannot
remove an entry early: the prune fails as a whole and is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from services.audit import tree
from services.audit.model import Checkpoint, StoredEntry
from services.audit.store import US_PER_DAY, Archive, AuditStore, check_retention
from tradeguard.audit import archive
from tradeguard.files import atomic_write
from tradeguard.observability.logging import get_logger

__all__ = ["SEGMENT_LIMIT", "Retention"]

_log = get_logger("audit.retention")

SEGMENT_LIMIT: Final = 10_000  # entries per archive segment


class Retention:
    """Archives, then prunes, the entries older than the retention period (see the module)."""

    def __init__(
        self,
        store: AuditStore,
        archive_dir: Path,
        days: int,
        interval_s: float,
        clock_us: Callable[[], int],
        *,
        segment_limit: int = SEGMENT_LIMIT,
    ) -> None:
        check_retention(days)
        if segment_limit < 1:
            raise ValueError(f"a segment holds at least one entry, not {segment_limit}")
        self._store = store
        self.archive_dir = archive_dir
        self.days = days
        self._interval_s = interval_s
        self._clock_us = clock_us
        self._segment_limit = segment_limit
        self._warned = False
        self.effective_days: int | None = None  # the period the database enforces (after a pass)

    async def run(self) -> None:
        """The background task: a pass now, then one every interval; failures logged, never raised."""
        while True:
            try:
                pruned = await self.run_once()
            except Exception as error:
                _log.error("audit.retention.failed", error=type(error).__name__, detail=str(error)[:500])
            else:
                if pruned:
                    _log.info("audit.retention.pruned", entries=pruned, retention_days=self.effective_days)
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> int:
        """One pass (see the module); the number of entries archived and removed."""
        now = self._clock_us()
        days = await self._store.record_retention(self.days, now)
        self.effective_days = days
        if days > self.days and not self._warned:
            self._warned = True
            _log.warning(
                "audit.retention.longer_kept",
                configured_days=self.days,
                enforced_days=days,
                detail="the database enforces the longest retention period ever recorded; the shorter "
                "configured one never takes effect",
            )
        latest = await self._store.latest_checkpoint()
        if latest is None:
            return 0
        cutoff = now - days * US_PER_DAY
        total = 0
        while True:
            batch = await self._store.expired(cutoff, latest.tree_size, self._segment_limit)
            if not batch:
                return total
            first = await self._store.pruned()
            sequences = [entry.sequence for entry in batch]
            if sequences != list(range(first, first + len(batch))):
                raise RuntimeError(
                    f"the audit log has a hole: the entries after the archived prefix (which ends before entry "
                    f"{first}) start at {sequences[0]}: nothing is archived nor removed"
                )
            total += await self._archive(first, batch, latest, now)
            if len(batch) < self._segment_limit:
                return total

    async def _archive(
        self,
        first: int,
        batch: list[StoredEntry],
        checkpoint: Checkpoint,
        now: int,
    ) -> int:
        keys = tree.subtree_keys(0, first)
        before = await self._store.nodes(keys) if keys else []
        rows = [(e.sequence, e.entry_bytes, e.leaf_hash) for e in batch]
        data = archive.encode_segment(
            first, before, rows, (checkpoint.tree_size, checkpoint.root_hash, checkpoint.note), now
        )
        last = first + len(rows) - 1
        name = archive.segment_name(first, last)
        await asyncio.to_thread(self._write, first, name, data)
        try:
            await self._store.prune(Archive(first, last, hashlib.sha256(data).digest(), name, now))
        except BaseException:
            await asyncio.to_thread(self._remove, name)  # not recorded: not part of the archive
            raise
        return len(rows)

    def _write(self, first: int, name: str, data: bytes) -> None:
        """The segment file, atomically, after removing the unrecorded files a crash may have left from `first`
        on (every recorded segment ends before `first`, the archived prefix's end)."""
        self.archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.archive_dir, 0o700)
        for path in self.archive_dir.iterdir():
            match = archive.SEGMENT_PATTERN.fullmatch(path.name)
            if match is not None and int(match.group(1)) >= first:
                path.unlink(missing_ok=True)
        atomic_write(self.archive_dir / name, data, 0o600)

    def _remove(self, name: str) -> None:
        (self.archive_dir / name).unlink(missing_ok=True)
