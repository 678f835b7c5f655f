"""The one mapping of plain domain errors to the rich error model (tradeguard.rpc.errors.to_rpc_status).

Each expected status is spelled out message by message: the mapping must produce exactly what the kit sent before
the errors became plain (ErrorInfo first, then BadRequest / RetryInfo / QuotaFailure, the retry-after trailer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from structlog.testing import capture_logs

from tradeguard.errors import (
    AlreadyExists,
    Code,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OpaqueError,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from tradeguard.observability.annotations import close_scope, open_scope
from tradeguard.rpc.errors import DOMAIN, to_rpc_status
from tradeguard.rpc.interceptor import ErrorInterceptor

SECRET = "hunter2-super-secret-value"


def _any(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _status(code: int, text: str, reason: str, *extra: message.Message, **metadata: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    return status_pb2.Status(code=code, message=text, details=[_any(info), *(_any(e) for e in extra)])


def _delay(seconds: int, nanos: int) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))


class _Opaque(OpaqueError):
    code = Code.UNAVAILABLE
    reason = "OPAQUE_TEST"
    public_message = "try again"


class _TooSoon(FailedPrecondition):
    retry_after_seconds = 0.123456


@pytest.mark.parametrize(
    ("error", "code", "expected"),
    [
        (
            NotFound("order not found", reason="ORDER_NOT_FOUND", metadata={"order_id": "o1"}),
            grpc.StatusCode.NOT_FOUND,
            _status(code_pb2.NOT_FOUND, "order not found", "ORDER_NOT_FOUND", order_id="o1"),
        ),
        (
            AlreadyExists("key already exists"),
            grpc.StatusCode.ALREADY_EXISTS,
            _status(code_pb2.ALREADY_EXISTS, "key already exists", "ALREADY_EXISTS"),
        ),
        (
            FailedPrecondition("order is filled, not open", reason="ORDER_NOT_OPEN"),
            grpc.StatusCode.FAILED_PRECONDITION,
            _status(code_pb2.FAILED_PRECONDITION, "order is filled, not open", "ORDER_NOT_OPEN"),
        ),
        (
            PermissionDenied("caller not allowed", reason="CALLER_NOT_ALLOWED"),
            grpc.StatusCode.PERMISSION_DENIED,
            _status(code_pb2.PERMISSION_DENIED, "caller not allowed", "CALLER_NOT_ALLOWED"),
        ),
        (
            Unavailable("the key vault is sealed", reason="VAULT_SEALED"),
            grpc.StatusCode.UNAVAILABLE,
            _status(code_pb2.UNAVAILABLE, "the key vault is sealed", "VAULT_SEALED"),
        ),
        (
            InvalidArgument(
                [FieldViolation("symbol", "required"), FieldViolation("side", "must be BUY or SELL")]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            _status(
                code_pb2.INVALID_ARGUMENT,
                "symbol: required; side: must be BUY or SELL",
                "INVALID_ARGUMENT",
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="symbol", description="required"),
                        error_details_pb2.BadRequest.FieldViolation(
                            field="side", description="must be BUY or SELL"
                        ),
                    ]
                ),
            ),
        ),
        (
            ResourceExhausted("key:abc", "10 requests per second", 1.2),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _status(
                code_pb2.RESOURCE_EXHAUSTED,
                "10 requests per second",
                "RATE_LIMITED",
                _delay(1, 200_000_000),
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject="key:abc", description="10 requests per second"
                        )
                    ]
                ),
            ),
        ),
        (
            ResourceExhausted(
                "key:abc",
                "1000 requests per day",
                0.0,
                [QuotaViolation("key:abc", "per second"), QuotaViolation("key:abc", "per day")],
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _status(
                code_pb2.RESOURCE_EXHAUSTED,
                "1000 requests per day",
                "RATE_LIMITED",
                _delay(0, 0),
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject="key:abc", description="per second"),
                        error_details_pb2.QuotaFailure.Violation(subject="key:abc", description="per day"),
                    ]
                ),
            ),
        ),
        (
            _TooSoon("retry later", reason="TOO_SOON", metadata={"retry_after_ms": "124"}),
            grpc.StatusCode.FAILED_PRECONDITION,
            _status(
                code_pb2.FAILED_PRECONDITION,
                "retry later",
                "TOO_SOON",
                _delay(0, 123_456_000),
                retry_after_ms="124",
            ),
        ),
        (
            Unauthenticated(cause=f"bad signature for secret {SECRET}"),
            grpc.StatusCode.UNAUTHENTICATED,
            _status(code_pb2.UNAUTHENTICATED, "authentication failed", "UNAUTHENTICATED"),
        ),
        (
            _Opaque(f"store password {SECRET}"),
            grpc.StatusCode.UNAVAILABLE,
            _status(code_pb2.UNAVAILABLE, "try again", "OPAQUE_TEST"),
        ),
        (
            RuntimeError(f"db password={SECRET}"),
            grpc.StatusCode.INTERNAL,
            _status(code_pb2.INTERNAL, "internal error", "INTERNAL"),
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_each_error_maps_to_the_same_rich_status(
    error: BaseException, code: grpc.StatusCode, expected: status_pb2.Status
) -> None:
    got_code, status, _ = to_rpc_status(error)
    assert got_code == code
    assert status == expected


@pytest.mark.parametrize(
    ("seconds", "header"), [(1.2, "2"), (1.0, "1"), (0.0, "1"), (0.001, "1"), (59.9, "60"), (-3.0, "1")]
)
def test_rate_limit_has_a_retry_after_trailer_in_whole_seconds_rounded_up(
    seconds: float, header: str
) -> None:
    _, _, trailers = to_rpc_status(ResourceExhausted("key:abc", "limit", seconds))
    assert trailers == [("retry-after", header)]


def test_only_a_rate_limit_has_a_retry_after_trailer() -> None:
    for error in (_TooSoon("later"), InvalidArgument.field("f", "bad"), RuntimeError("x")):
        assert to_rpc_status(error)[2] == []


def test_every_code_name_is_a_grpc_status_code() -> None:
    for code in Code:
        kind = type(f"Error{code.name}", (DomainError,), {"code": code})
        assert to_rpc_status(kind("m"))[0].name == code.value


def _everything_sent(status: status_pb2.Status, trailers: list[tuple[str, str]]) -> bytes:
    return bytes(status.SerializeToString()) + repr(trailers).encode()


@pytest.mark.parametrize(
    "error", [Unauthenticated(f"cause {SECRET}"), _Opaque(f"cause {SECRET}")], ids=lambda e: type(e).__name__
)
def test_an_opaque_errors_cause_is_logged_never_sent(error: OpaqueError) -> None:
    assert str(error) == error.public_message and error.metadata == {}
    # Inside an RPC: on the call's one log line.
    scope, token = open_scope()
    try:
        _, status, trailers = to_rpc_status(error)
    finally:
        close_scope(token)
    assert SECRET.encode() not in _everything_sent(status, trailers)
    assert status.message == error.public_message
    assert scope["cause"] == f"cause {SECRET}" and scope["error_reason"] == error.reason
    # Outside an RPC: a line of its own.
    with capture_logs() as logs:
        _, status, trailers = to_rpc_status(error)
    assert SECRET.encode() not in _everything_sent(status, trailers)
    assert [(line["event"], line["cause"]) for line in logs] == [("opaque_error", f"cause {SECRET}")]


def test_a_plain_errors_message_is_sent_and_nothing_is_logged() -> None:
    with capture_logs() as logs:
        _, status, _ = to_rpc_status(NotFound("order not found"))
    assert status.message == "order not found" and logs == []


# --- the same over a real call through the kit's error interceptor ---------------------------------------


async def _raise(request: bytes, context: object) -> bytes:
    if request == b"opaque":
        raise _Opaque(f"tag mismatch; key material {SECRET}")
    raise _SlowDown("retry in 1.5 s")


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.T", {"Call": grpc.unary_unary_rpc_method_handler(_raise)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def _call(target: str, kind: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/t.T/Call", None, None)(kind, timeout=5)
    return err.value


def _trailers(err: grpc.aio.AioRpcError) -> dict[str, str | bytes]:
    return {str(item[0]): item[1] for item in cast(Any, err.trailing_metadata() or ())}


def _details_bin(err: grpc.aio.AioRpcError) -> bytes:
    value = _trailers(err)["grpc-status-details-bin"]
    assert isinstance(value, bytes)
    return value


class _SlowDown(FailedPrecondition):
    retry_after_seconds = 1.5


async def test_an_opaque_error_over_the_wire_carries_no_cause(target: str) -> None:
    with capture_logs() as logs:
        err = await _call(target, b"opaque")
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "try again"
    assert SECRET not in str(err) and SECRET.encode() not in _details_bin(err)
    assert SECRET not in repr(_trailers(err))
    assert any(line.get("cause") == f"tag mismatch; key material {SECRET}" for line in logs)


async def test_a_retry_delay_over_the_wire(target: str) -> None:
    err = await _call(target, b"version")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = status_pb2.Status.FromString(_details_bin(err))
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry) and retry.retry_delay == duration_pb2.Duration(
        seconds=1, nanos=500_000_000
    )
    assert "retry-after" not in _trailers(err)
