"""Adaptive batching: many callers' items handed to one batch call (a group commit, or one batch RPC).

The contract, for a `Batcher` over `run_batch`:

- **No added latency at low load.** When nothing is in flight, an item goes at once, alone: no timer, no wait.
  While a batch is in flight, further items queue up; when it returns, everything queued (up to `max_batch`
  items, in arrival order) goes as the next batch. Items submitted in one event-loop turn while the batcher is
  idle go together (the batch starts on the next turn). Under load batches grow by themselves, and one call's
  cost is shared by many callers.
- **One batch in flight at a time**, in arrival order. `run_batch` is never called concurrently with itself.
- **Answered only after the batch call returned.** For a group commit, `run_batch` returns only after the COMMIT
  that includes every item (durable before ack); for a batch RPC, only after the reply.
- **Each item its own outcome.** `run_batch` returns one `Outcome` per item, in order: that item's value, or the
  exception that failed only that item (a write rolled back to its savepoint, an RPC item refused) — raised to
  that item's caller alone.
- **Whole-batch failure.** If `run_batch` raises (BEGIN or COMMIT failed, the transaction was aborted, the RPC
  failed), every caller of that batch gets that same exception; nothing of the batch may be taken as done. The
  batcher goes on with the next batch. Returning a wrong number of outcomes fails the whole batch the same way.
- **Cancellation.** A caller cancelled while its item is still queued is dropped: its item is never sent. Once
  its batch has started, the item runs to completion with the others (a write is committed or rolled back,
  never half done); the cancelled caller just does not wait for it. If the batcher's own task is cancelled
  (event-loop shutdown), every caller of the batch in flight and every queued caller is cancelled.
- **Bounded.** At most `max_pending` items wait in the queue; a `submit` beyond that raises `BatcherFull` at once
  (shed load, never grow without limit). `close()` refuses new items and waits for the queued ones.
- **Optional filling, under load only.** `fill_turns=N` (off by default) lets a batch that is not full wait up to
  N event-loop turns (`asyncio.sleep(0)`, never a timer) for more items before it is sent: more items per batch
  for a few loop turns of latency, for a batch call much dearer than a loop turn. It stops waiting once full.
  Only a batch that queued while the one before was in flight waits (the batcher is busy: more callers are
  coming); an item reaching an idle batcher still goes at once, so filling adds nothing at low load (where
  N turns of an otherwise idle loop would be pure delay and CPU). With `fill_patience=P` (0, the default: no
  limit) it also stops waiting once P turns in a row brought no new item: at moderate load, where a busy loop's
  turns are long and the callers are few, a batch goes soon after the last caller came instead of N turns later.

Counters: `batches` (calls of `run_batch`), `items` (items in them), `largest_batch`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_PENDING", "Batcher", "BatcherClosed", "BatcherFull", "Outcome"]

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_PENDING = 65_536


class BatcherFull(RuntimeError):
    """`max_pending` items are already queued: this one is refused (nothing was sent)."""


class BatcherClosed(RuntimeError):
    """The batcher is closed: nothing was sent."""


@dataclass(frozen=True, slots=True)
class Outcome(Generic[R]):
    """What one item of a batch came to: its value, or the exception that failed only that item."""

    value: R | None = None
    error: BaseException | None = None

    @classmethod
    def ok(cls, value: R) -> Outcome[R]:
        return cls(value=value)

    @classmethod
    def failed(cls, error: BaseException) -> Outcome[R]:
        return cls(error=error)


RunBatch = Callable[[Sequence[I]], Awaitable[Sequence[Outcome[R]]]]


class Batcher(Generic[I, R]):
    """Queues items of type `I` and hands them to `run_batch` in batches, one batch at a time (see the module).

    `run_batch(items)` returns one `Outcome[R]` per item, in order, only once the batch is done (committed, or
    answered); it raises when the batch as a whole failed.
    """

    def __init__(
        self,
        run_batch: RunBatch[I, R],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        fill_turns: int = 0,
        fill_patience: int = 0,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        if fill_turns < 0:
            raise ValueError(f"fill_turns must be 0 or more, not {fill_turns}")
        if fill_patience < 0:
            raise ValueError(f"fill_patience must be 0 or more, not {fill_patience}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.fill_turns = fill_turns
        self.fill_patience = fill_patience
        self.name = name
        self._pending: deque[tuple[I, asyncio.Future[R]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # calls of run_batch (for a group commit: transactions)
        self.items = 0  # items in those calls
        self.largest_batch = 0

    @property
    def pending(self) -> int:
        """Items queued and not yet handed to `run_batch` (cancelled ones included until they are skipped)."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, item: I) -> R:
        """Queue `item`; its value once its batch is done, or the exception that failed it (or its batch)."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed")
        if len(self._pending) >= self.max_pending:
            raise BatcherFull(f"{self.name}: {self.max_pending} items already queued")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name=self.name)
        return await future

    async def _fill(self) -> None:
        turns = quiet = 0
        patience = self.fill_patience
        while turns < self.fill_turns and len(self._pending) < self.max_batch:
            before = len(self._pending)
            await asyncio.sleep(0)
            turns += 1
            quiet = quiet + 1 if len(self._pending) == before else 0
            if patience and quiet >= patience:
                return

    def _take(self) -> list[tuple[I, asyncio.Future[R]]]:
        batch: list[tuple[I, asyncio.Future[R]]] = []
        while self._pending and len(batch) < self.max_batch:
            entry = self._pending.popleft()
            if not entry[1].done():  # cancelled while queued: never sent
                batch.append(entry)
        return batch

    async def _drain(self) -> None:
        busy = False  # a batch was just in flight: the items now queued came meanwhile (under load)
        try:
            while self._pending:
                if self.fill_turns and busy:
                    await self._fill()
                busy = True
                batch = self._take()
                if not batch:
                    continue
                self.batches += 1
                self.items += len(batch)
                self.largest_batch = max(self.largest_batch, len(batch))
                try:
                    outcomes = await self._run_batch([item for item, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)} items")
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except BaseException as error:  # the batch as a whole failed
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller was cancelled meanwhile
                        continue
                    if outcome.error is not None:
                        future.set_exception(outcome.error)
                    else:
                        future.set_result(outcome.value)  # type: ignore[arg-type] # None is a valid R here
        finally:
            self._drainer = None
            while self._pending:  # left only when the drainer itself was cancelled (loop shutdown)
                self._pending.popleft()[1].cancel()

    async def close(self) -> None:
        """Refuse new items and wait until every queued item has been done or failed. Idempotent."""
        self._closed = True
        drainer = self._drainer
        if drainer is not None:
            await asyncio.shield(drainer)
