"""Where the rate limiter's counters live: the contract every backend keeps (in process, Redis, Redis Cluster).

A backend evaluates `Evaluation`s (model.py states the semantics: sliding windows in buckets, every charge of one
request evaluated atomically, consumed all or nothing, shadow limits never refusing, `consume_refused` limits
charged even on a refusal):

- `evaluate(batch, now_us)`: one `Counted` per evaluation, in order; the batch is NOT atomic as a whole (each
  evaluation is), and costs one round trip to the store. An evaluation the store could not run is a
  `StoreUnavailable` in its place (nothing of it was consumed... or, for a reply lost on the way back, possibly
  all of it — never a part); the whole batch failing raises `StoreUnavailable`. `now_us` None: the store's own
  clock (Redis `TIME`, so that every replica of the service counts on one clock); tests pass a fake clock.
- `reset(subject, limits)`: forget what `subject` consumed on those limits; returns how many counters held
  something.
- `healthy()`: the store answers (for the service's health).
- `close()`.

Keys: a subject's counters all share one Redis Cluster hash slot (`{subject}`), so one request is one script
call on one node: `counter_key(subject, limit)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from services.ratelimit.model import Counted, Evaluation, Limit, StoreUnavailable

__all__ = ["KEY_PREFIX", "Counters", "counter_key"]

KEY_PREFIX: Final = "tg:rl:"


def counter_key(subject: str, limit: Limit) -> str:
    """`tg:rl:{<subject>}:<group>/<name>/<window µs>/<buckets>` (the subject is the cluster hash tag)."""
    return f"{KEY_PREFIX}{{{subject}}}:{limit.counter_id}"


class Counters(Protocol):
    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]: ...

    async def reset(self, subject: str, limits: Sequence[Limit]) -> int: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...
