"""The client side of the rich error model: a failed call's `google.rpc.Status`, decoded into plain values.

A server of the kit aborts with a `google.rpc.Status` in the `grpc-status-details-bin` trailer (ErrorInfo on
every error; BadRequest, RetryInfo, QuotaFailure where they apply) and, for rate limits, a `retry-after`
trailer (tradeguard.rpc.errors). `rich_status(error)` reads them back:

    try:
        await stub.PlaceOrder(request)
    except grpc.aio.AioRpcError as error:
        status = rich_status(error)
        if status.reason == "RATE_LIMITED": ...

The trailers come from the server, so they are untrusted input: decoding never raises on them. A missing,
oversized, unparsable or duplicated details trailer, or one whose code (or message) disagrees with the
call's own status, is ignored as a whole — the result then carries the call's code and message, no details,
and says why in `details_problem`. A detail that does not parse is skipped; the others are kept. Lists are
bounded, and a retry delay must be a valid, non-negative `google.protobuf.Duration`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from tradeguard.errors import FieldViolation, QuotaViolation
from tradeguard.rpc.errors import STATUS_DETAILS_KEY

__all__ = [
    "STATUS_DETAILS_KEY",
    "ErrorInfo",
    "FieldViolation",
    "QuotaViolation",
    "RichStatus",
    "decode_status",
    "describe_failure",
    "rich_status",
]

RETRY_AFTER_KEY: Final = "retry-after"

#: Bounds on what a server can make a client hold: the whole details trailer, and each list's length.
MAX_DETAILS_BYTES: Final = 64 * 1024
MAX_ITEMS: Final = 100
#: google.protobuf.Duration's own range (about 10,000 years).
_MAX_DURATION_S: Final = 315_576_000_000

_CODES_BY_NUMBER: Final = {code.value[0]: code for code in grpc.StatusCode}

DetailsProblem = Literal["missing", "too_large", "malformed", "duplicated", "inconsistent"]


@dataclass(frozen=True)
class ErrorInfo:
    reason: str
    domain: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RichStatus:
    """A call's final status with its decoded details; plain values only (no protobuf)."""

    code: grpc.StatusCode
    message: str
    error_info: ErrorInfo | None = None
    field_violations: tuple[FieldViolation, ...] = ()
    retry_delay_s: float | None = None
    """google.rpc.RetryInfo's delay, in seconds."""
    quota_violations: tuple[QuotaViolation, ...] = ()
    retry_after_s: int | None = None
    """The `retry-after` trailer (whole seconds), when present and a plain non-negative integer."""
    details_problem: DetailsProblem | None = None
    """Why the details trailer was ignored (None when it was used, or when the call was OK without one)."""

    @property
    def reason(self) -> str | None:
        """ErrorInfo's reason, the stable identifier to branch on."""
        return self.error_info.reason if self.error_info is not None else None


def rich_status(error: grpc.aio.AioRpcError | grpc.Call) -> RichStatus:
    """Decode a failed call (`grpc.aio.AioRpcError`, or a finished synchronous call / `grpc.RpcError`)."""
    code = error.code()
    return decode_status(
        code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        error.details() or "",
        error.trailing_metadata(),
    )


def decode_status(code: grpc.StatusCode, message: str, trailing_metadata: Iterable[Any] | None) -> RichStatus:
    """Decode from the call's code, message (`details()`) and trailing metadata; never raises on their content."""
    raw: list[str | bytes] = []
    retry_after: list[str | bytes] = []
    for key, value in _pairs(trailing_metadata):
        if key == STATUS_DETAILS_KEY:
            raw.append(value)
        elif key == RETRY_AFTER_KEY:
            retry_after.append(value)
    retry_after_s = _retry_after(retry_after[0]) if len(retry_after) == 1 else None
    plain = RichStatus(code=code, message=message, retry_after_s=retry_after_s)
    if not raw:
        return plain if code is grpc.StatusCode.OK else _with_problem(plain, "missing")
    if len(raw) > 1:
        return _with_problem(plain, "duplicated")
    data = raw[0]
    if not isinstance(data, bytes):
        return _with_problem(plain, "malformed")
    if len(data) > MAX_DETAILS_BYTES:
        return _with_problem(plain, "too_large")
    try:
        status = status_pb2.Status.FromString(data)
    except (DecodeError, RecursionError, ValueError):
        return _with_problem(plain, "malformed")
    if _CODES_BY_NUMBER.get(status.code) is not code or status.message != message:
        return _with_problem(plain, "inconsistent")
    return _details(plain, status.details)


def _pairs(metadata: Iterable[Any] | None) -> Iterable[tuple[str, str | bytes]]:
    if metadata is None:
        return
    try:
        for item in metadata:
            if isinstance(item, tuple) and len(item) == 2:
                key, value = item
                if isinstance(key, str) and isinstance(value, str | bytes):
                    yield key.lower(), value
    except (TypeError, ValueError):
        return


def _with_problem(status: RichStatus, problem: DetailsProblem) -> RichStatus:
    return RichStatus(
        code=status.code,
        message=status.message,
        retry_after_s=status.retry_after_s,
        details_problem=problem,
    )


def _retry_after(value: str | bytes) -> int | None:
    """RFC 9110 delay-seconds: ASCII digits only (no sign, space or date); bounded length."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not (0 < len(text) <= 12 and text.isascii() and text.isdigit()):
        return None
    return int(text)


def _unpack(detail: Any, message_class: Any) -> Any | None:
    if not detail.Is(message_class.DESCRIPTOR):
        return None
    message = message_class()
    try:
        if not detail.Unpack(message):
            return None
    except (DecodeError, RecursionError, ValueError):
        return None
    return message


def _duration_s(duration: Any) -> float | None:
    seconds, nanos = int(duration.seconds), int(duration.nanos)
    if not (0 <= seconds <= _MAX_DURATION_S and 0 <= nanos < 1_000_000_000):
        return None
    value = seconds + nanos / 1e9
    return value if math.isfinite(value) else None


def _details(status: RichStatus, details: Iterable[Any]) -> RichStatus:
    error_info: ErrorInfo | None = None
    violations: list[FieldViolation] = []
    quota: list[QuotaViolation] = []
    retry_delay_s: float | None = None
    for index, detail in enumerate(details):
        if index >= MAX_ITEMS:
            break
        if error_info is None and (info := _unpack(detail, error_details_pb2.ErrorInfo)) is not None:
            metadata = {str(k): str(v) for k, v in list(info.metadata.items())[:MAX_ITEMS]}
            error_info = ErrorInfo(reason=info.reason, domain=info.domain, metadata=metadata)
        elif (bad := _unpack(detail, error_details_pb2.BadRequest)) is not None:
            for v in bad.field_violations:
                if len(violations) < MAX_ITEMS:
                    violations.append(FieldViolation(field=v.field, description=v.description))
        elif retry_delay_s is None and (retry := _unpack(detail, error_details_pb2.RetryInfo)) is not None:
            if retry.HasField("retry_delay"):
                retry_delay_s = _duration_s(retry.retry_delay)
        elif (failure := _unpack(detail, error_details_pb2.QuotaFailure)) is not None:
            for q in failure.violations:
                if len(quota) < MAX_ITEMS:
                    quota.append(QuotaViolation(subject=q.subject, description=q.description))
    return RichStatus(
        code=status.code,
        message=status.message,
        error_info=error_info,
        field_violations=tuple(violations),
        retry_delay_s=retry_delay_s,
        quota_violations=tuple(quota),
        retry_after_s=status.retry_after_s,
    )


def describe_failure(error: BaseException) -> str:
    """A failed call in a few words for a log line: the exception's type and, for an RPC error, its status code —
    never its details, which carry the callee's message."""
    code = getattr(error, "code", None)
    if isinstance(error, grpc.aio.AioRpcError) and callable(code):
        return f"{type(error).__name__} {code()}"
    return type(error).__name__
