"""The one mapping of exceptions to the gRPC rich error model.

The errors themselves are plain (`tradeguard.errors`); only this module knows grpc and protobuf. `to_rpc_status`
turns any exception into a `google.rpc.Status` with an `ErrorInfo` first, then, by kind:
- `InvalidArgument` → `BadRequest` (one field violation per bad field);
- an error with `retry_after_seconds` → `RetryInfo`;
- `ResourceExhausted` → `RetryInfo`, `QuotaFailure` and a `retry-after` trailer in whole seconds, rounded up
  (the HTTP edge's `Retry-After`);
- `OpaqueError` → its fixed message only; its `cause` goes to the RPC's log line, never into the status;
- anything that is not a `DomainError` → an opaque `INTERNAL` that leaks nothing of its cause.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tradeguard.errors import DomainError, InvalidArgument, OpaqueError, ResourceExhausted
from tradeguard.observability.annotations import annotate
from tradeguard.observability.logging import get_logger

__all__ = ["DOMAIN", "STATUS_DETAILS_KEY", "details", "grpc_code", "to_rpc_status", "trailers"]

DOMAIN = "tradeguard.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"  # the trailer that carries the google.rpc.Status
_log = get_logger("tradeguard.rpc")


def grpc_code(error: DomainError) -> grpc.StatusCode:
    """The grpc status code of a domain error (the same name)."""
    return grpc.StatusCode[error.code.name]


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(max(seconds, 0.0) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def details(error: DomainError) -> list[any_pb2.Any]:
    """The detail messages after ErrorInfo: BadRequest, RetryInfo, QuotaFailure, as the error's kind has them."""
    out: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgument):
        out.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if error.retry_after_seconds is not None:
        out.append(_pack(_retry_info(error.retry_after_seconds)))
    if isinstance(error, ResourceExhausted):
        out.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    return out


def trailers(error: DomainError) -> list[tuple[str, str]]:
    """Plain trailers beside the status: `retry-after` (whole seconds, rounded up, at least 1) on a rate limit."""
    if isinstance(error, ResourceExhausted):
        return [("retry-after", str(max(1, -int(-error.retry_after_seconds // 1))))]
    return []


def _log_cause(error: OpaqueError) -> None:
    """An opaque error's cause goes to the log: the RPC's one line when a call is in progress, else a line."""
    if not annotate(error_reason=error.reason, cause=error.cause):
        _log.warning("opaque_error", reason=error.reason, cause=error.cause)


def to_rpc_status(error: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status, list[tuple[str, str]]]:
    """Map any exception to (code, google.rpc.Status, extra trailers). Unknown errors become INTERNAL."""
    if isinstance(error, DomainError):
        if isinstance(error, OpaqueError):
            _log_cause(error)
        code, reason, text, metadata = grpc_code(error), error.reason, error.message, error.metadata
        extra, plain = details(error), trailers(error)
    else:
        code, reason, text, metadata, extra, plain = (
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
            "internal error",
            {},
            [],
            [],
        )
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=text, details=[_pack(info), *extra])
    return code, status, plain
