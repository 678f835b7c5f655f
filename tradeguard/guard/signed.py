"""Signed API-key calls, verified by the auth service through ONE adaptive batcher per guard.

Concurrent calls share one VerifySignedRequests RPC (tradeguard.batching: sent at once when no batch is in flight,
queued while one is, sent together when it returns; a batch waits up to `fill_turns` event-loop turns for more
requests before it is sent, never a timer: the guard's BATCH_FILL_TURNS). At most `max_batch` requests per RPC
(default 256) and `max_pending` queued (default 4,096; beyond that a call is refused at once rather than queued
without limit).

`verify(request)` → the key's `Principal`, `PermissionDenied` (authentic, scopes lack the permission) or
`Unauthenticated(cause)`: refused by auth, auth unreachable or failing, the queue full, or the key revoked
meanwhile (the revocation stream is checked too, so a key revoked after auth answered is still refused).
"""

from __future__ import annotations

from typing import Final

from tradeguard.batching import Batcher, BatcherClosed, BatcherFull, RunBatch
from tradeguard.errors import DomainError, Unauthenticated
from tradeguard.guard.revocations import RevocationSet
from tradeguard.principal import Principal
from tradeguard.rpc.status import describe_failure
from tradeguard.signing import SignedRequest

__all__ = ["SignedVerifier"]

DEFAULT_MAX_BATCH: Final = 256
DEFAULT_MAX_PENDING: Final = 4096


class SignedVerifier:
    def __init__(
        self,
        verify_batch: RunBatch[SignedRequest, Principal],
        revocations: RevocationSet,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        fill_turns: int = 0,
        fill_patience: int = 0,
    ) -> None:
        self.batcher: Batcher[SignedRequest, Principal] = Batcher(
            verify_batch,
            max_batch=max_batch,
            max_pending=max_pending,
            fill_turns=fill_turns,
            fill_patience=fill_patience,
            name="guard-signed-requests",
        )
        self._revocations = revocations

    async def verify(self, request: SignedRequest) -> Principal:
        try:
            principal = await self.batcher.submit(request)
        except DomainError:  # this item's verdict: PermissionDenied or Unauthenticated
            raise
        except (BatcherFull, BatcherClosed) as error:
            raise Unauthenticated(f"signed-request verification refused ({type(error).__name__})") from None
        except Exception as error:
            raise Unauthenticated(f"auth service unavailable ({describe_failure(error)})") from None
        if principal.key_id is None or principal.key_id != request.key_id:
            raise Unauthenticated("auth answered for another key")
        if self._revocations.key_revoked(principal.key_id):
            raise Unauthenticated("key revoked")
        return principal

    async def close(self) -> None:
        await self.batcher.close()
