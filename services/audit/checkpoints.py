"""The checkpoint publisher: signed tree heads of the audit log, at least every second while it grows.

`CheckpointPublisher(log, store, signer, origin, interval_s)`; `run()` is the service's background task:
- it waits until the log has more entries than the last checkpoint (none are signed for an empty log, nor twice
  for one size), takes the log's size and root together (one synchronous read of the core's state), and writes
  the C2SP tlog-checkpoint body `tlog.checkpoint_body(origin, size, root)`;
- the key vault signs the body's bytes (`signer`: a `VaultSigner` on the key `audit/checkpoint`, Ed25519; the
  private key never leaves the vault); the signing version's public key (cached; the vault asked again for a
  version not seen yet, after a rotation) makes the C2SP signed note `tlog.signed_note(body, origin, key,
  signature)` — the note's key name is the origin;
- the note is opened again with that public key (`tlog.open_note`) before it is kept, so a signature the key does
  not verify is never published; then `store.add_checkpoint` keeps it (append-only, like the entries);
- then it sleeps `interval_s` (at most one signature per interval, whatever the append rate).

A failure (the vault unreachable, sealed or refusing, a note that does not verify, the store failing) is logged
(the error's type and, for the vault's opaque errors, its cause: operation, status code and reason — never a
signature, nor a driver's message) and retried after `interval_s`, doubling per failure in a row up to `MAX_RETRY_S`; it never ends the
task nor the service, and appends go on meanwhile (the next checkpoint covers them).

`close()` (a closer, run after the appends have drained) signs a last checkpoint when the log grew since the
previous one, within `CLOSE_TIMEOUT_S`; a failure is logged, not raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from services.audit.model import Checkpoint
from services.audit.store import AuditStore
from tradeguard.audit import tlog
from tradeguard.errors import OpaqueError
from tradeguard.observability.logging import get_logger

__all__ = ["CLOSE_TIMEOUT_S", "MAX_RETRY_S", "CheckpointPublisher", "GrowingLog", "Signer"]

_log = get_logger("audit.checkpoints")

MAX_RETRY_S: Final = 1.0  # at least one attempt a second while the vault is down: checkpoints resume at once
CLOSE_TIMEOUT_S: Final = 3.0


class Signer(Protocol):
    """What signs (tradeguard.keyvault.signer.VaultSigner)."""

    async def sign(self, message: bytes) -> tuple[int, bytes]: ...

    async def public_keys(self) -> list[tuple[int, bytes]]: ...


class GrowingLog(Protocol):
    """What the publisher reads of the log (services/audit/core.py AuditLog)."""

    @property
    def size(self) -> int: ...

    @property
    def root(self) -> bytes: ...

    async def wait_for(self, size: int) -> None: ...


def _cause(error: Exception) -> str:
    """What to log of a failure: the vault's opaque cause or the publisher's own message; else nothing more than
    the error's type (a driver's message may carry what a log must not)."""
    if isinstance(error, OpaqueError):
        return error.cause
    if isinstance(error, (tlog.NoteError, tlog.CheckpointError, _NoPublicKey)):
        return str(error)
    return ""


class _NoPublicKey(LookupError):
    """The vault published no public key for the version that signed."""


class CheckpointPublisher:
    def __init__(  # noqa: PLR0917 - what it reads, where it keeps, what signs, as whom, how often, by which clock
        self,
        log: GrowingLog,
        store: AuditStore,
        signer: Signer,
        origin: str,
        interval_s: float,
        clock_us: Callable[[], int],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._log = log
        self._store = store
        self._signer = signer
        self.origin = origin
        self.interval_s = interval_s
        self._clock_us = clock_us
        self._sleep = sleep
        self._keys: dict[int, bytes] = {}
        self.latest: Checkpoint | None = None
        self.failures = 0  # in a row
        self._loaded = False

    async def _load(self) -> None:
        if not self._loaded:
            self.latest = await self._store.latest_checkpoint()
            self._loaded = True

    @property
    def published_size(self) -> int:
        return 0 if self.latest is None else self.latest.tree_size

    async def _public_key(self, version: int) -> bytes:
        key = self._keys.get(version)
        if key is None:
            self._keys = dict(await self._signer.public_keys())
            key = self._keys.get(version)
            if key is None:
                raise _NoPublicKey(f"the vault published no public key for version {version}")
        return key

    async def publish(self) -> Checkpoint | None:
        """Sign and keep a checkpoint of the log as it is now; None when the last one already covers it."""
        await self._load()
        size, root = self._log.size, self._log.root  # together: no await between them
        if size <= self.published_size:
            return None
        body = tlog.checkpoint_body(self.origin, size, root)
        version, signature = await self._signer.sign(body.encode("utf-8"))
        public_key = await self._public_key(version)
        note = tlog.signed_note(body, self.origin, public_key, signature)
        try:
            tlog.open_note(note, self.origin, [public_key])
        except tlog.NoteError:
            self._keys.clear()  # asked again next time
            raise
        checkpoint = Checkpoint(tree_size=size, root_hash=root, note=note, time_us=self._clock_us())
        await self._store.add_checkpoint(checkpoint)
        self.latest = checkpoint
        _log.debug("audit.checkpoint", tree_size=size, key_version=version)
        return checkpoint

    async def run(self) -> None:
        """Publish while the log grows, until cancelled (see the module)."""
        while True:
            try:
                await self._load()
                await self._log.wait_for(self.published_size + 1)
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # logged and retried: never the end of the service
                self.failures += 1
                delay = min(self.interval_s * 2 ** (self.failures - 1), MAX_RETRY_S)
                _log.warning(
                    "audit.checkpoint_failed",
                    error=type(error).__name__,
                    cause=_cause(error),
                    failures=self.failures,
                    retry_in_s=delay,
                )
                await self._sleep(delay)
                continue
            self.failures = 0
            await self._sleep(self.interval_s)

    async def close(self) -> None:
        """A last checkpoint of what was appended since the previous one (see the module)."""
        try:
            await asyncio.wait_for(self.publish(), CLOSE_TIMEOUT_S)
        except Exception as error:  # shutting down: logged, the others close anyway
            _log.warning("audit.final_checkpoint_failed", error=type(error).__name__)
