"""The tail follower against a small audit log served in process (the generated AuditService on a plain loopback
server: GetEntries and Tail over a list of entries whose first ones retention "archived"), with the real engine
and SQLite store: it reads everything once and in order by pages, waits on the Tail when the log is idle and is
woken by the next append, and when entries it had not read were archived it moves on with one `audit_gap` alert —
silently when only its replay prefix was archived."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.monitor.core.config import MonitorConfig
from services.monitor.core.engine import AUDIT_GAP, Detectors, Monitor
from services.monitor.model import ActionRecord, ActionStatus, Alert, AlertFilter
from services.monitor.store_sqlite import SqliteMonitorStore
from services.monitor.tail import TailFollower
from tests.services.monitor.conftest import locate
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.testing import FakeClock, eventually


class Log(audit_pb2_grpc.AuditServiceServicer):
    """Entries `pruned`.. of a log (the ones before were archived), appended to by the test."""

    def __init__(self, size: int, pruned: int = 0) -> None:
        self.entries = [self.entry(i) for i in range(size)]
        self.pruned = pruned
        self.appended = asyncio.Condition()
        self.tails = 0
        self.pages = 0

    @staticmethod
    def entry(sequence: int) -> pb.StoredEntry:
        time = Timestamp(seconds=1_800_000_000 + sequence)
        event = pb.Event(event_id=f"e{sequence}", time=time, outcome=pb.OUTCOME_OK, method="/x.Y/Z")
        return pb.StoredEntry(
            sequence=sequence, entry=pb.Entry(record_time=time, recorder="spiffe://t/svc/x", event=event)
        )

    async def append(self, count: int) -> None:
        async with self.appended:
            self.entries += [self.entry(len(self.entries) + i) for i in range(count)]
            self.appended.notify_all()

    async def GetEntries(self, request: pb.GetEntriesRequest, context: Any) -> pb.GetEntriesResponse:
        self.pages += 1
        start = max(request.start, self.pruned)
        return pb.GetEntriesResponse(entries=self.entries[start : request.start + request.count])

    async def Tail(self, request: pb.TailRequest, context: Any) -> AsyncIterator[pb.TailResponse]:
        self.tails += 1
        if request.start < self.pruned:
            info = error_details_pb2.ErrorInfo(
                reason="ARCHIVED", domain="t", metadata={"first_available": str(self.pruned)}
            )
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(
                code=code_pb2.FAILED_PRECONDITION, message="archived", details=[detail]
            )
            await context.abort_with_status(rpc_status.to_status(status))
        following = request.start
        while True:
            async with self.appended:
                await self.appended.wait_for(lambda: len(self.entries) > following)
            while following < len(self.entries):
                yield pb.TailResponse(entry=self.entries[following])
                following += 1


class Nothing:
    async def act(self, alert: Alert, action: ActionRecord) -> tuple[ActionStatus, str]:
        return ActionStatus.DONE, ""

    async def record(self, alert: Alert, action: ActionRecord) -> bool:
        return True


@pytest.fixture
async def served() -> AsyncIterator[tuple[Log, str]]:
    log = Log(0)  # type: ignore[abstract]  # (the methods the follower never calls are not served)
    server = grpc.aio.server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(log, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield log, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def follow(
    log: Log, target: str, tmp_path: Path, *, position: int = 0, replay: int = 0
) -> AsyncIterator[Monitor]:
    store = await SqliteMonitorStore.open(tmp_path / "monitor.db")
    await store.commit(position, 0, [])
    monitor = Monitor(store, Detectors(MonitorConfig, locate), Nothing(), FakeClock())
    await monitor.open()
    follower = TailFollower(
        lambda: grpc.aio.insecure_channel(target), monitor, max_batch=50, replay=replay, page=100
    )
    task = asyncio.create_task(follower.run())
    try:
        yield monitor
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_pages_then_the_tail_wakes_it(served: tuple[Log, str], tmp_path: Path) -> None:
    log, target = served
    await log.append(1234)
    async with follow(log, target, tmp_path) as monitor:
        await eventually(lambda: monitor.position == 1234)
        assert log.pages >= 13  # 12 full pages of 100, a short one, then an empty one: idle
        await eventually(lambda: log.tails == 1)  # waiting on the Tail
        await log.append(1)
        await eventually(lambda: monitor.position == 1235)  # woken by the append
        await log.append(300)
        await eventually(lambda: monitor.position == 1535)
        assert monitor.detectors.events == 1535  # every entry once


async def test_archived_entries_it_had_not_read_raise_one_gap_alert(
    served: tuple[Log, str], tmp_path: Path
) -> None:
    log, target = served
    await log.append(500)
    log.pruned = 200  # 200 entries archived before the monitor (at position 50) read them
    async with follow(log, target, tmp_path, position=50) as monitor:
        await eventually(lambda: monitor.position == 500)
        gaps, _ = await monitor.store.list(
            AlertFilter(detector=AUDIT_GAP),
            10,
            "",
        )
        assert [
            (a.finding.evidence["first_missed"], a.finding.evidence["first_available"]) for a in gaps
        ] == [("50", "200")]
        assert monitor.detectors.events == 300


async def test_an_archived_replay_prefix_is_skipped_silently(served: tuple[Log, str], tmp_path: Path) -> None:
    log, target = served
    await log.append(500)
    log.pruned = 100  # the monitor stopped at 300; its replay of 1,000 would start at 0, archived: not a gap
    async with follow(log, target, tmp_path, position=300, replay=1000) as monitor:
        await eventually(lambda: monitor.position == 500)
        assert await monitor.store.open_alerts() == 0
        assert monitor.detectors.events == 400  # 100..499: the replay from the first available, then the rest
