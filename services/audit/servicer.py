"""AuditService over gRPC: proto ↔ core (services/audit/core.py `AuditLog`) and the store's reads, nothing else.

The mesh's authorisation interceptor has already checked the caller against services/audit/policy.py; errors are
DomainErrors (the kit maps them). What the servicer adds:
- Append / AppendBatch: the recorder is the caller's SPIFFE ID (from its certificate, never from the request);
  every event is validated (by the core, once) before anything is appended, naming the field
  (`event.event_id`, in a batch `events[i].event_id`, every bad event at once; `events` itself when empty or longer than MAX_BATCH); the answer
  comes only once the core has the events durable. An event id the recorder used before for another event is
  ALREADY_EXISTS (EVENT_ID_CONFLICT) naming the field; in a batch the others are recorded all the same (a retry
  of the batch answers them with `created` false), and the error names every conflicting event.
- Proofs against signed tree sizes only: `tree_size` / `second_size` at most the latest checkpoint's (0 in
  GetInclusionProof means the latest); before the first checkpoint, FAILED_PRECONDITION (NO_CHECKPOINT).
- GetEntries / Query / Tail answer entries as stored: the bytes the tree hashed, their leaf hash, and the `Entry`
  parsed from those very bytes.
- Query pages: `page_token` is opaque: base64url of the last sequence answered with a check value over it and the
  query (SHA-256, truncated), so a token altered, made up or presented with another query is INVALID_ARGUMENT
  naming `page_token`. Not a secret: whoever may Query may read every entry anyway.
- Tail: the stored entries from `start` (which may be beyond the end: it waits), then each new one as it
  commits, in sequence order; every message is the next sequence number (checked: never a gap, never a
  duplicate). A client that lost the stream resumes with `start` = the last sequence it received + 1. An entry
  that retention archived and removed (services/audit/retention.py: always a prefix of the log) is not served:
  a `start` before the end of the archived prefix is FAILED_PRECONDITION (reason ARCHIVED, metadata
  `first_available`), never silently skipped (a follower must know it did not get them: they are in the
  archive) nor a DATA_LOSS; the same when retention removes entries a slow follower has not read yet.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, Literal

from google.protobuf import timestamp_pb2

from services.audit import codec
from services.audit.core import AuditLog
from services.audit.model import (
    DEFAULT_PAGE,
    MAX_BATCH,
    MAX_PAGE,
    Appended,
    Checkpoint,
    Event,
    Outcome,
    Query,
    StoredEntry,
)
from services.audit.store import AuditStore, EventIdConflict
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.batching import BatcherClosed, BatcherFull
from tradeguard.errors import DataLoss, FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from tradeguard.mesh.identity import peer_spiffe_id
from tradeguard.observability.annotations import annotate

__all__ = ["MAX_QUERY_TEXT", "TAIL_READ", "AuditServicer", "page_token", "stored_entry_proto"]

Context = Any  # grpc.aio.ServicerContext

TAIL_READ: Final = 256  # entries per store read while tailing
MAX_QUERY_TEXT: Final = 1024  # characters of a Query's text field
_MAX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z
_TOKEN_VERSION: Final = 1
_TOKEN: Final = struct.Struct(">Bq8s")
_TOKEN_CHARS: Final = (_TOKEN.size * 4 + 2) // 3  # unpadded base64url
_EVENT: Final = ("event",)
_BATCH_FIELDS: Final = tuple(f"events[{i}]" for i in range(MAX_BATCH))  # a batch's field names, made once


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, us = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=us * 1000)


def stored_entry_proto(stored: StoredEntry) -> pb.StoredEntry:
    return pb.StoredEntry(
        sequence=stored.sequence,
        entry=pb.Entry.FromString(stored.entry_bytes),
        entry_bytes=stored.entry_bytes,
        leaf_hash=stored.leaf_hash,
    )


def checkpoint_proto(checkpoint: Checkpoint) -> pb.SignedCheckpoint:
    return pb.SignedCheckpoint(
        note=checkpoint.note,
        tree_size=checkpoint.tree_size,
        root_hash=checkpoint.root_hash,
        time=_timestamp(checkpoint.time_us),
    )


def appended_proto(appended: Appended) -> pb.Appended:
    return pb.Appended(sequence=appended.sequence, leaf_hash=appended.leaf_hash, created=appended.created)


def _check_value(query: Query, after: int) -> bytes:
    fingerprint = "\x00".join(
        (
            query.principal,
            query.account_id,
            query.api_key_id,
            query.method,
            str(int(query.outcome)),
            str(query.start_us),
            str(query.end_us),
            str(after),
        )
    )
    return hashlib.sha256(b"tradeguard.audit.page\x00" + fingerprint.encode("utf-8")).digest()[:8]


def page_token(query: Query, after: int) -> str:
    """The opaque token of the page after sequence `after` of `query`."""
    raw = _TOKEN.pack(_TOKEN_VERSION, after, _check_value(query, after))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _after_of(token: str, query: Query) -> int:
    """The last sequence a page token answered (-1 without a token); INVALID_ARGUMENT naming page_token."""
    if not token:
        return -1
    bad = InvalidArgument.field(
        "page_token", "not a page token of this query (pass next_page_token unchanged)"
    )
    if len(token) != _TOKEN_CHARS or not token.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    if len(raw) != _TOKEN.size:
        raise bad
    version, after, check = _TOKEN.unpack(raw)
    if version != _TOKEN_VERSION or after < 0 or check != _check_value(query, after):
        raise bad
    return int(after)


def _text(value: str, field: str, violations: list[FieldViolation]) -> str:
    if len(value) > MAX_QUERY_TEXT or not value.isprintable():
        violations.append(FieldViolation(field, f"at most {MAX_QUERY_TEXT} printable characters"))
    return value


def _time_us(
    message: pb.QueryRequest, field: Literal["start_time", "end_time"], violations: list[FieldViolation]
) -> int | None:
    if not message.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, field)
    if not 0 <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        violations.append(FieldViolation(field, "a time from 1970-01-01 to 9999-12-31 (UTC)"))
        return None
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _page_size(value: int, field: str = "page_size") -> int:
    if not 0 <= value <= MAX_PAGE:
        raise InvalidArgument.field(field, f"1 to {MAX_PAGE}, or 0 for {DEFAULT_PAGE}")
    return value or DEFAULT_PAGE


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Every RPC of tradeguard.audit.v1.AuditService over the core and the store (see the module)."""

    def __init__(self, log: AuditLog, store: AuditStore) -> None:
        self._log = log
        self._store = store

    # --- recording ---------------------------------------------------------------------------------------------

    def _violations(self, messages: Sequence[pb.Event], field: str) -> list[FieldViolation]:
        """Every bad field of `messages` (named `field[i]`), in order: what the model refuses (an unknown enum
        value) and, for the events it accepts, what the core's validation refuses."""
        violations: list[FieldViolation] = []
        for index, message in enumerate(messages):
            name = f"{field}[{index}]"
            try:
                violations += self._log.violations(codec.event_from_proto(message, name), name)
            except InvalidArgument as error:
                violations += error.violations
        return violations

    async def _append(
        self, events: Sequence[Event], fields: Sequence[str], context: Context
    ) -> list[Appended | EventIdConflict]:
        """The core validates every event (naming it by `fields`) before any is appended."""
        recorder = peer_spiffe_id(context)
        if recorder is None:  # the mesh admits only callers with a SPIFFE ID: never here
            raise Unavailable("the caller has no workload identity", reason="NO_RECORDER")
        try:
            return await self._log.append(events, recorder, fields)
        except (BatcherFull, BatcherClosed) as error:
            raise Unavailable("the audit log is overloaded or stopping", reason="OVERLOADED") from error

    async def Append(self, request: pb.AppendRequest, context: Context) -> pb.AppendResponse:
        event = codec.event_from_proto(request.event, "event")
        (result,) = await self._append([event], _EVENT, context)
        if isinstance(result, EventIdConflict):
            raise EventIdConflict(
                "event.event_id: already recorded by this recorder for a different event",
                metadata={"field": "event.event_id"},
            )
        annotate(sequence=result.sequence, created=result.created, event_id=event.event_id)
        return pb.AppendResponse(appended=appended_proto(result))

    async def AppendBatch(self, request: pb.AppendBatchRequest, context: Context) -> pb.AppendBatchResponse:
        messages = request.events
        if not messages:
            raise InvalidArgument.field("events", "at least one event")
        if len(messages) > MAX_BATCH:
            raise InvalidArgument.field("events", f"at most {MAX_BATCH} events, got {len(messages)}")
        fields = _BATCH_FIELDS[: len(messages)]
        try:
            events = [codec.event_from_proto(m, name) for m, name in zip(messages, fields, strict=True)]
        except InvalidArgument:  # name every bad field of every event, not only the first one's
            raise InvalidArgument(self._violations(messages, "events")) from None
        results = await self._append(events, fields, context)
        conflicts = [f"events[{i}].event_id" for i, r in enumerate(results) if isinstance(r, EventIdConflict)]
        annotate(events=len(events), conflicts=len(conflicts))
        if conflicts:
            raise EventIdConflict(
                f"{', '.join(conflicts)}: already recorded by this recorder for a different event (the batch's "
                "other events are recorded)",
                metadata={"fields": ",".join(conflicts)},
            )
        return pb.AppendBatchResponse(
            appended=[appended_proto(r) for r in results if isinstance(r, Appended)]
        )

    # --- checkpoints and proofs --------------------------------------------------------------------------------

    async def _signed_size(self) -> int:
        latest = await self._store.latest_checkpoint()
        if latest is None:
            raise FailedPrecondition("no checkpoint has been signed yet", reason="NO_CHECKPOINT")
        return latest.tree_size

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: Context
    ) -> pb.GetCheckpointResponse:
        latest = await self._store.latest_checkpoint()
        if latest is None:
            return pb.GetCheckpointResponse()
        annotate(tree_size=latest.tree_size)
        return pb.GetCheckpointResponse(checkpoint=checkpoint_proto(latest))

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: Context
    ) -> pb.ListCheckpointsResponse:
        if request.after_size < 0:
            raise InvalidArgument.field("after_size", "0 or more")
        limit = _page_size(request.page_size)
        found = await self._store.checkpoints(request.after_size, limit)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_proto(c) for c in found])

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: Context
    ) -> pb.GetInclusionProofResponse:
        if request.sequence < 0:
            raise InvalidArgument.field("sequence", "0 or more")
        if request.tree_size < 0:
            raise InvalidArgument.field("tree_size", "0 (the latest checkpoint's) or a signed size")
        signed = await self._signed_size()
        size = request.tree_size or signed
        if size > signed:
            raise InvalidArgument.field("tree_size", f"at most the latest checkpoint's size ({signed})")
        if request.sequence >= size:
            raise InvalidArgument.field("sequence", f"an entry of the tree of size {size} (below it)")
        # the leaf as the tree recorded it (its level-0 node), not the entries row: after an attacker rewrote a
        # row's bytes and hash together, the proof still shows what the signed tree holds there
        (leaf,) = await self._store.nodes([(0, request.sequence)])
        hashes = await self._log.inclusion_proof(request.sequence, size)
        annotate(sequence=request.sequence, tree_size=size)
        return pb.GetInclusionProofResponse(tree_size=size, leaf_hash=leaf, hashes=hashes)

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: Context
    ) -> pb.GetConsistencyProofResponse:
        if request.first_size < 1:
            raise InvalidArgument.field("first_size", "1 or more")
        if request.second_size < request.first_size:
            raise InvalidArgument.field("second_size", "at least first_size")
        signed = await self._signed_size()
        if request.second_size > signed:
            raise InvalidArgument.field("second_size", f"at most the latest checkpoint's size ({signed})")
        hashes = await self._log.consistency_proof(request.first_size, request.second_size)
        annotate(first_size=request.first_size, second_size=request.second_size)
        return pb.GetConsistencyProofResponse(hashes=hashes)

    # --- reading -----------------------------------------------------------------------------------------------

    async def GetEntries(self, request: pb.GetEntriesRequest, context: Context) -> pb.GetEntriesResponse:
        if request.start < 0:
            raise InvalidArgument.field("start", "0 or more")
        if not 1 <= request.count <= MAX_PAGE:
            raise InvalidArgument.field("count", f"1 to {MAX_PAGE}")
        found = await self._store.entries(request.start, request.count)
        annotate(start=request.start, entries=len(found))
        return pb.GetEntriesResponse(entries=[stored_entry_proto(e) for e in found])

    async def Query(self, request: pb.QueryRequest, context: Context) -> pb.QueryResponse:
        violations: list[FieldViolation] = []
        principal = _text(request.principal, "principal", violations)
        account_id = _text(request.account_id, "account_id", violations)
        api_key_id = _text(request.api_key_id, "api_key_id", violations)
        method = _text(request.method, "method", violations)
        try:
            outcome = Outcome(request.outcome)
        except ValueError:
            violations.append(FieldViolation("outcome", f"unknown outcome {request.outcome}"))
            outcome = Outcome.UNSPECIFIED
        start_us = _time_us(request, "start_time", violations)
        end_us = _time_us(request, "end_time", violations)
        if start_us is not None and end_us is not None and end_us <= start_us:
            violations.append(FieldViolation("end_time", "after start_time"))
        if not 0 <= request.page_size <= MAX_PAGE:
            violations.append(FieldViolation("page_size", f"1 to {MAX_PAGE}, or 0 for {DEFAULT_PAGE}"))
        if violations:
            raise InvalidArgument(violations)
        query = Query(
            principal=principal,
            account_id=account_id,
            api_key_id=api_key_id,
            method=method,
            outcome=outcome,
            start_us=start_us,
            end_us=end_us,
        )
        after = _after_of(request.page_token, query)
        limit = request.page_size or DEFAULT_PAGE
        found = await self._store.query(query, after, limit + 1)
        page, more = found[:limit], len(found) > limit
        annotate(entries=len(page), more=more)
        return pb.QueryResponse(
            entries=[stored_entry_proto(e) for e in page],
            next_page_token=page_token(query, page[-1].sequence) if more and page else "",
        )

    async def _check_not_archived(self, sequence: int) -> None:
        """FAILED_PRECONDITION (ARCHIVED) when retention archived and removed entry `sequence`."""
        pruned = await self._store.pruned()
        if sequence < pruned:
            raise FailedPrecondition(
                f"entries before {pruned} were archived and removed from the log by retention (see the audit "
                f"service's archive directory): tail from {pruned}",
                reason="ARCHIVED",
                metadata={"first_available": str(pruned)},
            )

    async def Tail(self, request: pb.TailRequest, context: Context) -> AsyncIterator[pb.TailResponse]:
        if request.start < 0:
            raise InvalidArgument.field("start", "0 or more")
        following = request.start
        annotate(start=following)
        while True:
            await self._log.wait_for(following + 1)
            count = min(self._log.size - following, TAIL_READ)
            found = await self._store.entries(following, count)
            if not found or found[0].sequence != following:
                await self._check_not_archived(following)
                # the log says entry `following` exists and the store has no such row: a hole (an attacker
                # with the database, or damage); never skipped, and retrying will not help
                raise DataLoss(f"entry {following} is missing from the log", reason="LOG_DAMAGED")
            for stored in found:
                if stored.sequence != following:  # never a gap nor a duplicate
                    raise DataLoss(f"entry {following} is missing from the log", reason="LOG_DAMAGED")
                yield pb.TailResponse(entry=stored_entry_proto(stored))
                following += 1
