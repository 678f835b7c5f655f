"""The auth service's hot state: nonces, failure counters and locks, TOTP steps, revocations.

`HotState` is kept in process for the embedded default (one replica) and in Redis by configuration (replicas
share it). Every method is atomic on its own; the guarantees below hold across replicas sharing one Redis.
Every entry has a time to live, so a flood of distinct keys, nonces or addresses cannot grow it without limit
(the in-process backend also caps its entries and says what it evicts).
"""

from __future__ import annotations

import builtins
from typing import Protocol

from services.auth.model import Revocation, RevocationKind

__all__ = ["HotState"]


class HotState(Protocol):
    async def claim_nonce(self, key_id: str, nonce: str, ttl_us: int) -> bool:
        """True for the first claim of (key_id, nonce) within `ttl_us`; False for every replay."""
        ...

    async def advance_totp_step(self, user_id: str, step: int, ttl_us: int) -> bool:
        """True only if `step` is greater than the last step accepted for the user (which it then becomes):
        a code is accepted once, and an older code never after a newer one."""
        ...

    async def count_failure(self, subject: str, window_us: int) -> int:
        """Count one failure of `subject` (for example `pair:<account>|<ip>`, `account:<id>`, `key:<id>`,
        `ip:<addr>`) and return the failures within the last `window_us`."""
        ...

    async def clear_failures(self, subject: str) -> None: ...

    async def lock(self, subject: str, until_us: int) -> None:
        """Lock `subject` until `until_us` (a later lock extends it, an earlier one does not shorten it)."""
        ...

    async def locked_until(self, subject: str, now_us: int) -> int | None:
        """When the lock on `subject` ends, or None when it is not locked at `now_us`."""
        ...

    async def unlock(self, subject: str) -> None: ...

    async def put_challenge(self, challenge_hash: str, user_id: str, ttl_us: int) -> None:
        """Remember a second-factor challenge (the hash of the opaque mfa_token Login returned) for `ttl_us`."""
        ...

    async def take_challenge(self, challenge_hash: str) -> str | None:
        """The challenge's user id, once: the first call takes it, every later one (or after expiry) gets None."""
        ...

    async def publish_revocation(
        self, kind: RevocationKind, value: str, revoke_time_us: int, expire_time_us: int
    ) -> Revocation:
        """Append a revocation (its sequence is the next one) and wake every `revocations_after` waiter."""
        ...

    async def revocations_after(self, sequence: int, wait_s: float = 0.0) -> builtins.list[Revocation]:
        """The unexpired revocations with a sequence greater than `sequence`, oldest first; when there are none,
        wait up to `wait_s` seconds for the next one (a stream to the guards is this in a loop)."""
        ...

    async def close(self) -> None: ...
