"""Group commit: adaptive batching of durable writes into shared transactions.

While a batch is being written, further writes queue up; when it finishes, everything queued (up to `max_batch`
writes) goes as the next batch, in ONE transaction. A lone write at low load goes at once: no timers, no added
latency. The backend runs each write of a batch inside its own SAVEPOINT, so a failing write rolls back only
itself and its own caller gets its own exception, while the others commit. Every caller is answered only after
the COMMIT that includes its write has returned (durable before ack); if the transaction as a whole fails
(BEGIN, COMMIT, or an error that aborted the transaction), every write of the batch fails with that error.

Batches run one at a time, in arrival order. A caller that is cancelled before its batch starts is dropped
from the queue; once its batch has started its write runs to COMMIT or ROLLBACK like the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["DEFAULT_MAX_BATCH", "GroupCommit", "Outcome"]

W = TypeVar("W")

DEFAULT_MAX_BATCH = 256


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one write of a committed batch returned, or the exception that rolled back only that write."""

    value: object = None
    error: BaseException | None = None


RunBatch = Callable[[Sequence[W]], Awaitable[Sequence[Outcome]]]


class GroupCommit(Generic[W]):
    """Queues writes of type `W` and hands them to `run_batch` in batches, one batch at a time.

    `run_batch(works)` must write all of `works` in one transaction and return one `Outcome` per write, in order,
    only after the COMMIT returned; it raises when the transaction as a whole failed (nothing of it stored).
    """

    def __init__(self, run_batch: RunBatch[W], *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self._pending: deque[tuple[W, asyncio.Future[Any]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self.transactions = 0  # batches handed to run_batch (each one transaction)
        self.writes = 0  # writes in those batches
        self.largest_batch = 0

    async def submit(self, work: W) -> Any:
        """Queue `work`; return its result once the transaction that includes it has committed."""
        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((work, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name="group-commit")
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch: list[tuple[W, asyncio.Future[Any]]] = []
                while self._pending and len(batch) < self.max_batch:
                    entry = self._pending.popleft()
                    if not entry[1].done():  # cancelled while queued: never started, so never written
                        batch.append(entry)
                if not batch:
                    continue
                self.transactions += 1
                self.writes += len(batch)
                self.largest_batch = max(self.largest_batch, len(batch))
                try:
                    outcomes = await self._run_batch([work for work, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)} writes")
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except BaseException as error:  # the transaction as a whole failed: nothing of it is stored
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if outcome.error is not None:
                        future.set_exception(outcome.error)
                    else:
                        future.set_result(outcome.value)
        finally:
            self._drainer = None
            while self._pending:  # left only when the drainer itself was cancelled (loop shutdown)
                self._pending.popleft()[1].cancel()

    async def close(self) -> None:
        """Refuse new writes and wait until every queued write has been committed or failed."""
        self._closed = True
        drainer = self._drainer
        if drainer is not None:
            await asyncio.shield(drainer)
