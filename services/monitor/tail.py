"""Following the audit log: `TailFollower.run()` reads the audit service's Tail from the monitor's stored position
and hands the entries to the engine in batches, for ever.

- Batches: a reader task puts each streamed entry on a bounded queue (`2 x max_batch`: the stream waits while the
  engine is behind, nothing piles up in memory); the engine takes what is there, up to `max_batch`, at once — one
  entry when traffic is light (no added delay), large batches under load (one transaction each).
- No gap, no repeat: the first stream starts `replay` entries before the engine's stored `position` (the detectors
  warm up on entries already processed; the engine drops what they trigger), later ones where the last stream
  stopped; every entry must be the next one: a sequence out of order ends the stream and it starts again there.
- The stream ending or failing (the audit service restarting, the network) is retried after a backoff (0.1 s
  doubling to 5 s, reset once entries flow again). FAILED_PRECONDITION reason ARCHIVED (retention removed entries
  before they were read) moves the position to the metadata's `first_available` with a critical `audit_gap` alert
  (`Monitor.gap`), then follows on — unless only the replayed prefix was archived: then it starts at
  `first_available` silently (those entries were processed before).

`decode(stored)` turns an audit `StoredEntry` into the detectors' `AuditEvent`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import grpc

from services.monitor.core.engine import Monitor
from services.monitor.model import AuditEvent, Outcome
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.status import describe_failure, rich_status

__all__ = ["MAX_BACKOFF_S", "TailFollower", "decode"]

MAX_BACKOFF_S: Final = 5.0
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


_END: Final = object()


class TailFollower:
    def __init__(
        self, channel: grpc.aio.Channel, monitor: Monitor, max_batch: int = 500, replay: int = 10_000
    ) -> None:
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)
        self._monitor = monitor
        self._max_batch = max_batch
        self._replay = replay
        self._next: int | None = None  # the next sequence to read (None: not started)
        self.connections = 0

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                flowed = await self._follow()
                if flowed:
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
                    first = int(info.metadata["first_available"])
                    self._next = first
                    if first > self._monitor.position:
                        _log.error("audit_gap", missed_from=self._monitor.position, first_available=first)
                        await self._monitor.gap(self._monitor.position, first)
                    continue
                _log.warning("tail_failed", cause=describe_failure(error), position=self._monitor.position)
            except Exception as error:  # the engine's store failing, an entry out of order: start again
                _log.error("tail_failed", cause=describe_failure(error), position=self._monitor.position)
            finally:
                self._monitor.following = False
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _follow(self) -> bool:
        """One stream, until it ends or fails; whether any entry was processed."""
        monitor = self._monitor
        if self._next is None:
            self._next = max(0, monitor.position - self._replay)
        start = self._next
        call = self._stub.Tail(pb.TailRequest(start=start), timeout=None)
        queue: asyncio.Queue[object] = asyncio.Queue(2 * self._max_batch)

        async def read() -> None:
            try:
                async for reply in call:
                    await queue.put(reply.entry)
                await queue.put(_END)
            except Exception as error:  # handed to the engine's side, which raises it
                await queue.put(error)

        reader = asyncio.create_task(read(), name="monitor:tail-reader")
        self.connections += 1
        monitor.following = True
        flowed = False
        try:
            while True:
                item = await queue.get()
                batch: list[AuditEvent] = []
                ended: object = None
                while True:
                    if isinstance(item, pb.StoredEntry):
                        batch.append(decode(item))
                    else:
                        ended = item
                        break
                    if len(batch) >= self._max_batch or queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    expected = self._next
                    for offset, event in enumerate(batch):
                        if event.sequence != expected + offset:
                            raise _OutOfOrder(
                                f"entry {event.sequence} where {expected + offset} was expected"
                            )
                    await monitor.process(batch)
                    self._next = batch[-1].sequence + 1
                    flowed = True
                if ended is _END:
                    return flowed
                if isinstance(ended, BaseException):
                    raise ended
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
