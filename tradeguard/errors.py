"""The domain errors every service core raises: plain fields only (no grpc, no protobuf).

A core raises these; the kit's one mapping, `tradeguard.rpc.errors.to_rpc_status`, turns them into the gRPC rich
error model (`google.rpc.Status` with `ErrorInfo`, plus `BadRequest`, `RetryInfo`, `QuotaFailure` and the
`retry-after` trailer where they apply). So a core, and its tests, never import grpc or protobuf.

What a caller sees of an error is its `code`, `reason` (a stable UPPER_SNAKE_CASE identifier), `message` and
`metadata`, and the typed fields of its kind (field violations, retry delay, quota violations). An `OpaqueError`
is the exception: the caller always gets its one fixed message and reason; its `cause` is for the log (the kit's
mapping writes it there), never for the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "Code",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OpaqueError",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]


class Code(enum.StrEnum):
    """The canonical status codes (google.rpc.Code, grpc.StatusCode), by name. OK is not an error."""

    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, by its proto field name (a BadRequest field violation)."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota (a QuotaFailure violation): whose, and which limit."""

    subject: str
    description: str


class DomainError(Exception):
    """An error a caller may see: `code`, a stable `reason`, a `message` and string `metadata`.

    `retry_after_seconds`, when set, tells the caller when a retry may succeed (RetryInfo).
    """

    code: ClassVar[Code] = Code.INTERNAL
    reason: str = "INTERNAL"
    retry_after_seconds: float | None = None

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class OpaqueError(DomainError):
    """An error whose caller always gets one fixed `public_message` and `reason`, whatever went wrong.

    `cause` says what went wrong: the kit's mapping logs it (on the RPC's log line) and never sends it. No
    metadata either: nothing of the cause may reach the caller. Subclasses set `code`, `reason` and
    `public_message`.
    """

    public_message: ClassVar[str] = "request failed"

    def __init__(self, cause: str = "") -> None:
        super().__init__(self.public_message)
        self.cause = cause


class InvalidArgument(DomainError):
    """The request is malformed: every bad field at once, by proto field name."""

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(
        self, violations: Iterable[FieldViolation] | FieldViolation, *, reason: str | None = None
    ) -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, reason=reason)

    @classmethod
    def field(cls, name: str, description: str) -> InvalidArgument:
        return cls(FieldViolation(name, description))


class NotFound(DomainError):
    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = Code.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    code = Code.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(DomainError):
    code = Code.UNAVAILABLE
    reason = "UNAVAILABLE"


class DataLoss(DomainError):
    """Stored data is missing or damaged (an append-only log with a hole): retrying will not help."""

    code = Code.DATA_LOSS
    reason = "DATA_LOSS"


class Unauthenticated(OpaqueError):
    """Authentication failed: one opaque answer whatever the cause (DESIGN.md, the request path)."""

    code = Code.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"
    public_message = "authentication failed"


class ResourceExhausted(DomainError):
    """A rate limit or quota: when to retry (RetryInfo and a whole-second `retry-after` trailer) and which
    quotas are exhausted (QuotaFailure; by default the one `subject` / `limit_description`)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"
    retry_after_seconds: float

    def __init__(
        self,
        subject: str,
        limit_description: str,
        retry_after_seconds: float,
        violations: Iterable[QuotaViolation] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(limit_description, reason=reason, metadata=metadata)
        self.subject = subject
        self.limit_description = limit_description
        self.retry_after_seconds = retry_after_seconds
        self.violations = list(violations) or [QuotaViolation(subject, limit_description)]
