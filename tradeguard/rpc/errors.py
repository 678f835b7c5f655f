"""Domain errors and their one mapping to the gRPC rich error model.

Every service raises these from its core; the servicer layer never builds a status by hand.
`to_rpc_status` turns any exception into a `google.rpc.Status` with an `ErrorInfo`; anything
that is not a `DomainError` becomes an opaque `INTERNAL` that leaks nothing of its cause.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "tradeguard.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """An error a caller may see. `reason` is a stable UPPER_SNAKE_CASE identifier."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        """Extra detail messages beyond ErrorInfo (BadRequest, RetryInfo, ...)."""
        return []

    def trailers(self) -> list[tuple[str, str]]:
        """Extra plain trailers (for example `retry-after`)."""
        return []


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation, *, reason: str | None = None):
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, reason=reason)

    @classmethod
    def field(cls, name: str, description: str) -> InvalidArgument:
        return cls(FieldViolation(name, description))

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [_pack(bad)]


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    """Always the same opaque message: the cause goes to the log, never to the caller."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"

    def __init__(self, cause: str = "") -> None:
        super().__init__("authentication failed")
        self.cause = cause


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


@dataclass
class ResourceExhausted(DomainError):
    """Rate limit or quota: RetryInfo, QuotaFailure and a `retry-after` trailer (whole seconds)."""

    subject: str
    limit_description: str
    retry_after_seconds: float
    violations: list[tuple[str, str]] = field(default_factory=list)

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __post_init__(self) -> None:
        DomainError.__init__(self, self.limit_description)

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(max(self.retry_after_seconds, 0.0) * 1e9))
        retry = error_details_pb2.RetryInfo(retry_delay=delay)
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                for subject, description in (self.violations or [(self.subject, self.limit_description)])
            ]
        )
        return [_pack(retry), _pack(quota)]

    def trailers(self) -> list[tuple[str, str]]:
        return [("retry-after", str(max(1, -int(-self.retry_after_seconds // 1))))]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status, list[tuple[str, str]]]:
    """Map any exception to (code, google.rpc.Status, extra trailers). Unknown errors become INTERNAL."""
    if isinstance(error, DomainError):
        code, reason, message = error.code, error.reason, error.message
        metadata, extra, trailers = error.metadata, error.details(), error.trailers()
    else:
        code, reason, message, metadata, extra, trailers = (
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
            "internal error",
            {},
            [],
            [],
        )
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=[_pack(info), *extra]
    )
    return code, status, trailers
