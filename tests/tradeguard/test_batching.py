"""The adaptive batcher's contract (tradeguard/batching.py): a lone item goes at once, concurrent ones share a batch,
one batch in flight at a time, each item its own outcome, whole-batch failure, cancellation, bounds, close, and
the optional `fill_turns`; then the same batcher as a group commit on real SQLite and PostgreSQL (durable before
ack, a failing write fails only its caller, a failed COMMIT fails the whole batch).

The group commit of the trading store, through its own API, is tested in tests/services/trading/test_store.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import PG_DSN, Database, open_database
from tradeguard.batching import Batcher, BatcherClosed, BatcherFull, Outcome
from tradeguard.storage.migrations import Migration
from tradeguard.storage.postgres import Conn, Pool, open_pool, write_batch
from tradeguard.storage.sqlite import SqliteWorker
from tradeguard.testing import eventually


class Remote:
    """A batch call under the test's control: records each batch, and holds it in flight until released.

    Doubles each number; a negative number fails only its own item; a batch containing "fail" fails whole."""

    def __init__(self, *, hold: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold = hold
        self.release = asyncio.Event()
        self.finished: list[list[Any]] = []

    async def __call__(self, items: Sequence[Any]) -> list[Outcome[int]]:
        self.batches.append(list(items))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold:
                await self.release.wait()
            if "fail" in items:
                raise ConnectionError("the batch call failed")
            outcomes: list[Outcome[int]] = []
            for item in items:
                if item < 0:
                    outcomes.append(Outcome.failed(ValueError(f"refused {item}")))
                else:
                    outcomes.append(Outcome.ok(2 * item))
            self.finished.append(list(items))
            return outcomes
        finally:
            self.in_flight -= 1


async def test_a_lone_item_goes_at_once_alone() -> None:
    remote = Remote()
    batcher: Batcher[int, int] = Batcher(remote)
    assert await batcher.submit(21) == 42
    assert remote.batches == [[21]]
    assert (batcher.batches, batcher.items, batcher.largest_batch) == (1, 1, 1)
    # No timer: the batch call has started by the time the event loop has run the batcher's task once.
    remote.hold = True
    call = asyncio.ensure_future(batcher.submit(5))
    await asyncio.sleep(0)  # the caller queues its item and starts the batcher's task
    await asyncio.sleep(0)  # the batcher's task runs
    assert remote.batches[-1] == [5]
    remote.release.set()
    assert await call == 10


async def test_items_of_one_turn_share_a_batch_and_answers_keep_their_order() -> None:
    remote = Remote()
    batcher: Batcher[int, int] = Batcher(remote)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == [2 * i for i in range(10)]
    assert remote.batches == [list(range(10))]


async def test_one_batch_in_flight_and_the_queue_goes_next_in_arrival_order() -> None:
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote, max_batch=4)
    first = asyncio.ensure_future(batcher.submit(0))
    await eventually(lambda: len(remote.batches) == 1)
    later = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 11)]
    await eventually(lambda: batcher.pending == 10)
    assert len(remote.batches) == 1  # nothing else is sent while a batch is in flight
    remote.release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [2 * i for i in range(1, 11)]
    assert remote.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]  # max_batch 4, in order
    assert remote.most_in_flight == 1
    assert (batcher.batches, batcher.items, batcher.largest_batch) == (4, 11, 4)


async def test_an_item_error_goes_to_its_own_caller_only() -> None:
    batcher: Batcher[int, int] = Batcher(Remote())
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and str(results[1]) == "refused -2"
    assert batcher.batches == 1


async def test_a_failed_batch_fails_every_caller_with_its_error_and_the_next_batch_goes_on() -> None:
    remote = Remote()
    batcher: Batcher[Any, int] = Batcher(remote)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, "fail", 3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert len({id(r) for r in results}) == 1  # the batch's one error
    assert remote.finished == []
    assert await batcher.submit(4) == 8


async def test_a_wrong_number_of_outcomes_fails_the_whole_batch() -> None:
    async def short(items: Sequence[int]) -> list[Outcome[int]]:
        return [Outcome.ok(0)]

    batcher: Batcher[int, int] = Batcher(short)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "1 outcomes for a batch of 3" in str(r) for r in results)


async def test_cancelled_while_queued_is_never_sent_cancelled_once_sent_still_runs() -> None:
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote)
    sent = asyncio.ensure_future(batcher.submit(1))
    await eventually(lambda: remote.batches == [[1]])
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
    await eventually(lambda: batcher.pending == 3)
    sent.cancel()
    queued[1].cancel()
    remote.release.set()
    assert await queued[0] == 4 and await queued[2] == 8
    with pytest.raises(asyncio.CancelledError):
        await sent
    with pytest.raises(asyncio.CancelledError):
        await queued[1]
    assert remote.finished == [[1], [2, 4]]  # 1 ran to its end; 3 was never sent


async def test_cancelling_the_batchers_task_cancels_every_waiting_caller() -> None:
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote, name="doomed")
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await eventually(lambda: len(remote.batches) == 1)
    queued = asyncio.ensure_future(batcher.submit(9))
    await eventually(lambda: batcher.pending == 1)
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "doomed"]
    task.cancel()  # what event-loop shutdown does
    for call in (*calls, queued):
        with pytest.raises(asyncio.CancelledError):
            await call
    assert batcher.pending == 0
    remote.hold = False
    assert await batcher.submit(2) == 4  # a new task serves the next items


async def test_the_queue_is_bounded() -> None:
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote, max_pending=3)
    first = asyncio.ensure_future(batcher.submit(0))
    await eventually(lambda: len(remote.batches) == 1)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
    await eventually(lambda: batcher.pending == 3)
    with pytest.raises(BatcherFull, match="3 items already queued"):
        await batcher.submit(4)
    remote.release.set()
    assert await first == 0 and await asyncio.gather(*queued) == [2, 4, 6]
    assert 4 not in [item for batch in remote.batches for item in batch]


async def test_close_waits_for_the_queue_then_refuses() -> None:
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote, name="orders")
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
    await eventually(lambda: len(remote.batches) == 1)
    more = [asyncio.ensure_future(batcher.submit(i)) for i in range(5, 8)]
    await eventually(lambda: batcher.pending == 3)
    closing = asyncio.ensure_future(batcher.close())
    await eventually(lambda: batcher.closed)
    with pytest.raises(BatcherClosed, match="orders is closed"):
        await batcher.submit(99)
    remote.release.set()
    await closing
    assert all(call.done() for call in (*calls, *more))
    assert [c.result() for c in (*calls, *more)] == [2 * i for i in range(8)]
    await batcher.close()  # idempotent


async def _trickle(batcher: Batcher[int, int], n: int) -> list[asyncio.Future[int]]:
    """One item per event-loop turn, as callers arriving one after another."""
    calls: list[asyncio.Future[int]] = []
    for i in range(n):
        calls.append(asyncio.ensure_future(batcher.submit(i)))
        await asyncio.sleep(0)
    return calls


async def _under_load(batcher: Batcher[int, int], remote: Remote) -> list[asyncio.Future[int]]:
    """An item to the idle batcher (held in flight), one queued behind it, the first released, then four callers
    one turn after another: the calls."""
    calls = [asyncio.ensure_future(batcher.submit(100))]
    await eventually(lambda: remote.batches == [[100]])
    calls.append(asyncio.ensure_future(batcher.submit(101)))
    await eventually(lambda: batcher.pending == 1)
    remote.release.set()  # the batch returns: the batcher was busy, so the next one may fill
    return calls + await _trickle(batcher, 4)


async def test_fill_turns_lets_a_batch_queued_under_load_wait_a_few_loop_turns_for_more_items() -> None:
    without, filling = Remote(hold=True), Remote(hold=True)
    plain: Batcher[int, int] = Batcher(without)
    filled: Batcher[int, int] = Batcher(filling, fill_turns=8)
    await asyncio.gather(*await _under_load(plain, without), *await _under_load(filled, filling))
    assert without.batches[0] == [100] and len(without.batches) > 2  # off by default: no waiting for more
    assert filling.batches == [[100], [101, 0, 1, 2, 3]]  # waited a few turns (no timer), took the later ones


async def test_fill_patience_sends_once_turns_in_a_row_bring_nothing() -> None:
    """Under load (a batch held in flight, one item queued behind it): two callers one turn apart, then none. With
    patience 2 the batch goes two quiet turns after the last caller instead of waiting all 1000 turns; callers
    coming later go in the next batch."""
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote, fill_turns=1000, fill_patience=2)
    calls: list[asyncio.Future[int]] = [asyncio.ensure_future(batcher.submit(100))]
    await eventually(lambda: remote.batches == [[100]])
    calls.append(asyncio.ensure_future(batcher.submit(101)))
    await eventually(lambda: batcher.pending == 1)
    remote.release.set()
    calls += await _trickle(batcher, 2)
    await eventually(lambda: len(remote.batches) == 2)  # no 1000 turns: sent after two quiet ones
    assert remote.batches[1] == [101, 0, 1]
    assert await asyncio.gather(*calls) == [200, 202, 0, 2]


async def test_an_item_reaching_an_idle_batcher_goes_at_once_even_with_fill_turns() -> None:
    remote = Remote()
    batcher: Batcher[int, int] = Batcher(remote, fill_turns=1000)
    assert await batcher.submit(1) == 2
    assert await batcher.submit(2) == 4  # no 1000 turns of waiting: each found the batcher idle
    assert remote.batches == [[1], [2]]


async def test_fill_turns_stops_waiting_once_the_batch_is_full() -> None:
    remote = Remote(hold=True)
    batcher: Batcher[int, int] = Batcher(remote, fill_turns=1000, max_batch=3)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
    for _ in range(3):  # the callers queue their items; the batcher's task runs: no 1000 turns of waiting
        await asyncio.sleep(0)
    assert remote.batches == [[0, 1, 2]]
    remote.release.set()
    assert await asyncio.gather(*calls) == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("option", "value"), [("max_batch", 0), ("max_pending", 0), ("fill_turns", -1), ("fill_patience", -1)]
)
def test_settings_are_checked(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=option):
        Batcher(Remote(), **{option: value})  # type: ignore[arg-type]


# --- the batcher as a group commit on real databases ------------------------------------------------------

NOTES = (
    Migration(
        1,
        "notes",
        [
            "CREATE TABLE {schema}.notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL CHECK (body <> 'bad'))",
            # A row naming 'poison' makes the COMMIT fail (a deferred foreign key) though its statement succeeded.
            "CREATE TABLE {schema}.refs (note INTEGER REFERENCES {schema}.notes (id) DEFERRABLE INITIALLY DEFERRED)",
        ],
    ),
)


class GroupCommitDb(Database):
    """A `notes` table and a batcher whose `run_batch` is the backend's group-commit `write_batch`."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "notes.db", "tg_batch_test")
        self.worker: SqliteWorker | None = None
        self.pool: Pool | None = None

    async def start(self) -> Batcher[Any, object]:
        if self.kind == "sqlite":
            self.worker = self.opened(await SqliteWorker.open(self.path, NOTES))
            return Batcher(self.worker.write_batch)
        self.pool = self.opened(await open_pool(PG_DSN, self.schema, NOTES, max_size=2))
        pool = self.pool

        async def run_batch(works: Sequence[Callable[[Conn], Awaitable[object]]]) -> list[Outcome[object]]:
            async with pool.connection() as conn:
                return await write_batch(conn, works)

        return Batcher(run_batch)

    def insert(self, note_id: int, body: str) -> Any:
        """A write inserting one note (and a dangling reference when `body` is 'poison')."""
        if self.kind == "sqlite":

            def work(conn: sqlite3.Connection) -> int:
                conn.execute("INSERT INTO notes (id, body) VALUES (?, ?)", (note_id, body))
                if body == "poison":
                    conn.execute("INSERT INTO refs (note) VALUES (-1)")
                return note_id

            return work
        notes, refs = (psycopg.sql.Identifier(self.schema, t) for t in ("notes", "refs"))

        async def pg_work(conn: Conn) -> int:
            await conn.execute(psycopg.sql.SQL("INSERT INTO {} (id, body) VALUES (%s, %s)").format(notes),
                               (note_id, body))  # fmt: skip
            if body == "poison":
                await conn.execute(psycopg.sql.SQL("INSERT INTO {} (note) VALUES (-1)").format(refs))
            return note_id

        return pg_work

    def ids(self) -> list[int]:
        return [i for (i,) in self.execute("SELECT id FROM {schema}.notes ORDER BY id")]


@pytest.fixture(params=["sqlite", "postgres"])
async def notes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GroupCommitDb]:
    async with open_database(GroupCommitDb, request.param, tmp_path) as database:
        yield database


async def test_group_commit_is_durable_before_ack_and_a_failing_write_fails_alone(
    notes: GroupCommitDb,
) -> None:
    batcher = await notes.start()
    acked: list[int] = []

    async def write(i: int, body: str) -> None:
        await batcher.submit(notes.insert(i, body))
        # Acknowledged: another connection sees the row (committed, not merely written).
        assert i in notes.ids()
        acked.append(i)

    results = await asyncio.gather(
        *(write(i, "bad" if i == 4 else f"note {i}") for i in range(1, 9)), return_exceptions=True
    )
    assert batcher.batches == 1 and batcher.largest_batch == 8
    failed = [r for r in results if r is not None]
    assert len(failed) == 1 and "check" in str(failed[0]).lower()
    assert sorted(acked) == notes.ids() == [1, 2, 3, 5, 6, 7, 8]


async def test_group_commit_a_failed_commit_fails_the_whole_batch(notes: GroupCommitDb) -> None:
    batcher = await notes.start()
    await batcher.submit(notes.insert(1, "kept"))
    bodies = ["a", "b", "poison", "c"]
    results = await asyncio.gather(
        *(batcher.submit(notes.insert(10 + i, body)) for i, body in enumerate(bodies)), return_exceptions=True
    )
    assert all(isinstance(r, Exception) for r in results)
    assert len({id(r) for r in results}) == 1  # the COMMIT's one error, for every caller
    assert notes.ids() == [1]  # nothing of the batch is stored
    assert await batcher.submit(notes.insert(2, "after")) == 2  # and the next batch goes on
    assert notes.ids() == [1, 2]
    await batcher.close()
