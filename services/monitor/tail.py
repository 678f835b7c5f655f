"""Following the audit log: `TailFollower.run()` reads the audit service's log (GetEntries pages, the Tail to wake
up) from the monitor's stored position and hands the entries to the engine in batches, for ever.

- Pages while entries come, a stream only to wake up. The follower reads `GetEntries` pages of `PAGE` entries
  from the next sequence (one RPC per page: a streamed message costs far more per entry in grpc.aio), each page
  processed in batches of at most `max_batch` (one transaction each). A full page is followed by the next at once;
  a short one (caught up while entries keep coming) by the next after `COALESCE_S` (20 ms), so that the entries
  appended meanwhile share a page instead of each costing a round trip; an empty page means the log is idle: the
  follower opens the `Tail` from the next sequence and waits — the first entry appended is processed at once and
  the follower goes back to pages. Detection is thus at most about 20 ms behind the log while traffic flows and
  immediate when it was idle.
- No gap, no repeat: the first read starts `replay` entries before the engine's stored `position` (the detectors
  warm up on entries already processed; the engine drops what they trigger), later ones where the last stopped;
  every entry must be the next one: one out of order ends the attempt and it starts again there.
- A failing read (the audit service restarting, the network) is retried after a backoff (0.1 s doubling to 5 s,
  reset once entries flow again), on a fresh channel. Entries retention archived before they were read (a Tail's
  FAILED_PRECONDITION reason ARCHIVED with `first_available`, or a page starting past the next sequence) move the
  position there with a critical `audit_gap` alert (`Monitor.gap`), then it follows on — unless only the replayed
  prefix was archived: then it starts there silently (those entries were processed before).

The channel: a plain mutual-TLS channel (`channels()`), made afresh after a failure (so a renewed certificate is
read at the next connection), without the kit's client interceptors, which cost a task per streamed message and add
nothing here (no request id to carry; the stream has no deadline, the pages have theirs).

`decode(stored)` turns an audit `StoredEntry` into the detectors' `AuditEvent`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import grpc

from services.monitor.core.engine import Monitor
from services.monitor.model import AuditEvent, Outcome
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.status import describe_failure, rich_status

__all__ = ["COALESCE_S", "MAX_BACKOFF_S", "PAGE", "TailFollower", "decode"]

MAX_BACKOFF_S: Final = 5.0
PAGE: Final = 1000  # entries per GetEntries page (the audit service's maximum)
COALESCE_S: Final = 0.02  # after a short page while entries keep coming, before the next one
_OUTCOMES: Final = {o.value: o for o in Outcome}

_log = get_logger("services.monitor.tail")


def decode(stored: pb.StoredEntry) -> AuditEvent:
    entry = stored.entry
    event = entry.event
    return AuditEvent(
        sequence=stored.sequence,
        time_us=event.time.seconds * 1_000_000 + event.time.nanos // 1000,
        record_time_us=entry.record_time.seconds * 1_000_000 + entry.record_time.nanos // 1000,
        recorder=entry.recorder,
        principal=event.principal,
        account_id=event.account_id,
        api_key_id=event.api_key_id,
        source_ip=event.source_ip,
        method=event.method,
        action=event.action,
        outcome=_OUTCOMES.get(event.outcome, Outcome.UNSPECIFIED),
        status_code=event.status_code,
        details=dict(event.details),
    )


class _OutOfOrder(Exception):
    pass


_BEHIND: Final = object()
_FLOWED: Final = object()
_IDLE: Final = object()


class TailFollower:
    def __init__(
        self,
        channels: Callable[[], grpc.aio.Channel],
        monitor: Monitor,
        *,
        max_batch: int = 500,
        replay: int = 10_000,
        page: int = PAGE,
        coalesce_s: float = COALESCE_S,
    ) -> None:
        self._channels = channels
        self._stub: audit_pb2_grpc.AuditServiceAsyncStub | None = None
        self._monitor = monitor
        self._max_batch = max_batch
        self._replay = replay
        self._page_size = page
        self._coalesce_s = coalesce_s
        self._next: int | None = None  # the next sequence to read (None: not started)
        self.connections = 0  # Tail streams opened
        self.pages = 0  # GetEntries pages read

    async def run(self) -> None:
        backoff = 0.1
        channel: grpc.aio.Channel | None = None
        try:
            while True:
                if channel is None:  # a fresh channel (and certificate) after a failure
                    channel = self._channels()
                    self._stub = audit_pb2_grpc.AuditServiceStub(channel)
                failed = False
                try:
                    ended = await self._follow()
                    if ended is _BEHIND:
                        continue  # back to pages at once, on the same channel
                    if ended is _FLOWED:
                        backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as error:
                    status = rich_status(error)
                    info = status.error_info
                    if (
                        status.code == grpc.StatusCode.FAILED_PRECONDITION
                        and info is not None
                        and info.reason == "ARCHIVED"
                        and info.metadata.get("first_available", "").isdigit()
                    ):
                        await self._skip_to(int(info.metadata["first_available"]))
                        continue
                    failed = True
                    _log.warning(
                        "tail_failed", cause=describe_failure(error), position=self._monitor.position
                    )
                except Exception as error:  # the engine's store failing, an entry out of order: start again
                    failed = True
                    _log.error("tail_failed", cause=describe_failure(error), position=self._monitor.position)
                finally:
                    self._monitor.following = False
                if failed:
                    await channel.close(None)
                    channel = self._stub = None
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        finally:
            if channel is not None:
                await channel.close(None)

    async def _skip_to(self, first: int) -> None:
        """Entries before `first` are gone (archived): read on from there, with an alert if they were not
        processed yet (see the module)."""
        self._next = first
        if first > self._monitor.position:
            _log.error("audit_gap", missed_from=self._monitor.position, first_available=first)
            await self._monitor.gap(self._monitor.position, first)

    async def _process(self, batch: list[AuditEvent]) -> None:
        expected = self._next
        assert expected is not None
        for offset, event in enumerate(batch):
            if event.sequence != expected + offset:
                raise _OutOfOrder(f"entry {event.sequence} where {expected + offset} was expected")
        await self._monitor.process(batch)
        self._next = batch[-1].sequence + 1

    async def _page(self) -> int:
        """One GetEntries page from the next sequence, processed; how many entries it held."""
        assert self._next is not None and self._stub is not None
        reply = await self._stub.GetEntries(
            pb.GetEntriesRequest(start=self._next, count=self._page_size), timeout=30
        )
        self.pages += 1
        entries = reply.entries
        if entries and entries[0].sequence > self._next:  # the start was archived meanwhile
            await self._skip_to(entries[0].sequence)
        for i in range(0, len(entries), self._max_batch):
            await self._process([decode(e) for e in entries[i : i + self._max_batch]])
        return len(entries)

    async def _follow(self) -> object:
        """Pages while entries come, the stream only to wake up when the log is idle (see the module): `_BEHIND`
        (the stream woke it: pages again, at once), `_FLOWED` (entries were processed, the stream ended) or
        `_IDLE`."""
        stub = self._stub
        assert stub is not None
        monitor = self._monitor
        if self._next is None:
            self._next = max(0, monitor.position - self._replay)
        flowed = False
        while True:
            count = await self._page()
            monitor.following = True
            if count == 0:
                break
            flowed = True
            if count < self._page_size:  # caught up while entries keep coming: let the next page gather them
                await asyncio.sleep(self._coalesce_s)
        call = stub.Tail(pb.TailRequest(start=self._next), timeout=None)
        self.connections += 1
        try:
            async for reply in call:  # idle: the first entry appended wakes the follower
                await self._process([decode(reply.entry)])
                return _BEHIND
        finally:
            call.cancel()
        return _FLOWED if flowed else _IDLE
