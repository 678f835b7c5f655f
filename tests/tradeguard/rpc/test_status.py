"""Decoding a call's rich status on the client: what the kit's servers send, and what a hostile server could."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tradeguard.rpc.status import (
    MAX_ITEMS,
    STATUS_DETAILS_KEY,
    ErrorInfo,
    FieldViolation,
    QuotaViolation,
    decode_status,
    rich_status,
)
from tradeguard.trading.v1 import trading_pb2

if TYPE_CHECKING:
    from tests.conftest import RunningTrading

Trailers = list[tuple[str, str | bytes]]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _status_bytes(code: int, message: str, *details: object) -> bytes:
    status = status_pb2.Status(code=code, message=message, details=[_pack(d) for d in details])
    return bytes(status.SerializeToString())


def test_invalid_argument_decodes_error_info_and_field_violations() -> None:
    # what the kit's server interceptor sends for InvalidArgument.field("symbol", ...)
    info = error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="tradeguard.dev")
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="symbol", description="must look like BTC-USD")
        ]
    )
    message = "symbol: must look like BTC-USD"
    raw = _status_bytes(code_pb2.INVALID_ARGUMENT, message, info, bad)
    status = decode_status(grpc.StatusCode.INVALID_ARGUMENT, message, [(STATUS_DETAILS_KEY, raw)])
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.message == "symbol: must look like BTC-USD"
    assert status.error_info == ErrorInfo("INVALID_ARGUMENT", "tradeguard.dev", {})
    assert status.reason == "INVALID_ARGUMENT"
    assert status.field_violations == (FieldViolation("symbol", "must look like BTC-USD"),)
    assert status.retry_delay_s is None and status.retry_after_s is None
    assert status.details_problem is None


def test_rate_limit_decodes_retry_info_quota_failure_and_retry_after() -> None:
    # what the kit's server interceptor sends for a rate limit: RetryInfo, QuotaFailure, retry-after
    info = error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="tradeguard.dev")
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=200_000_000))
    quota = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject="key:abc", description="10 requests per second")
        ]
    )
    message = "10 requests per second"
    raw = _status_bytes(code_pb2.RESOURCE_EXHAUSTED, message, info, retry, quota)
    status = decode_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, [(STATUS_DETAILS_KEY, raw), ("retry-after", "2")]
    )
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.reason == "RATE_LIMITED"
    assert status.retry_delay_s == pytest.approx(1.2)
    assert status.quota_violations == (QuotaViolation("key:abc", "10 requests per second"),)
    assert status.retry_after_s == 2


def test_error_info_metadata_and_domain_are_kept() -> None:
    info = error_details_pb2.ErrorInfo(reason="VERSION_TOO_NEW", domain="x.example", metadata={"key": "k1"})
    raw = _status_bytes(code_pb2.FAILED_PRECONDITION, "too new", info)
    status = decode_status(grpc.StatusCode.FAILED_PRECONDITION, "too new", [(STATUS_DETAILS_KEY, raw)])
    assert status.error_info == ErrorInfo("VERSION_TOO_NEW", "x.example", {"key": "k1"})


def test_no_trailer_gives_the_calls_code_and_message() -> None:
    status = decode_status(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    assert (status.code, status.message, status.error_info) == (
        grpc.StatusCode.UNAVAILABLE,
        "connection refused",
        None,
    )
    assert status.details_problem == "missing"
    assert decode_status(grpc.StatusCode.OK, "", ()).details_problem is None


@pytest.mark.parametrize(
    ("trailers", "problem"),
    [
        ([(STATUS_DETAILS_KEY, b"\xff\xff\xff garbage")], "malformed"),
        ([(STATUS_DETAILS_KEY, "not bytes")], "malformed"),
        ([(STATUS_DETAILS_KEY, b"\x0a" + b"\xff" * 10)], "malformed"),
        ([(STATUS_DETAILS_KEY, b"x" * (64 * 1024 + 1))], "too_large"),
        (
            [
                (STATUS_DETAILS_KEY, _status_bytes(code_pb2.NOT_FOUND, "m")),
                (STATUS_DETAILS_KEY, _status_bytes(code_pb2.NOT_FOUND, "m")),
            ],
            "duplicated",
        ),
    ],
)
def test_garbage_trailers_are_ignored_not_raised(trailers: Trailers, problem: str) -> None:
    status = decode_status(grpc.StatusCode.NOT_FOUND, "m", trailers)
    assert status.code == grpc.StatusCode.NOT_FOUND and status.message == "m"
    assert status.error_info is None
    assert status.details_problem == problem


def test_a_status_whose_code_differs_from_the_calls_is_rejected_as_inconsistent() -> None:
    # a server (or a proxy) claiming OK details on a failed call, or another error's details
    info = error_details_pb2.ErrorInfo(reason="FINE", domain="evil.example")
    for code, message in (
        (code_pb2.OK, "m"),
        (code_pb2.INVALID_ARGUMENT, "m"),
        (code_pb2.NOT_FOUND, "other"),
    ):
        raw = _status_bytes(code, message, info)
        status = decode_status(grpc.StatusCode.NOT_FOUND, "m", [(STATUS_DETAILS_KEY, raw)])
        assert status.details_problem == "inconsistent"
        assert status.error_info is None and status.code == grpc.StatusCode.NOT_FOUND


def test_unparsable_or_unknown_details_are_skipped_and_the_rest_kept() -> None:
    broken = any_pb2.Any(type_url="type.googleapis.com/google.rpc.BadRequest", value=b"\xff\xff")
    unknown = _pack(trading_pb2.Order(order_id="o-1"))
    info = error_details_pb2.ErrorInfo(reason="R", domain="d")
    raw = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="m", details=[broken, unknown, _pack(info)]
    ).SerializeToString()
    status = decode_status(grpc.StatusCode.INVALID_ARGUMENT, "m", [(STATUS_DETAILS_KEY, raw)])
    assert status.reason == "R" and status.field_violations == ()
    assert status.details_problem is None


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [(3, 500_000_000, 3.5), (-1, 0, None), (0, -5, None), (0, 2_000_000_000, None), (10**12, 0, None)],
)
def test_retry_delay_must_be_a_valid_non_negative_duration(
    seconds: int, nanos: int, expected: float | None
) -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    raw = _status_bytes(code_pb2.RESOURCE_EXHAUSTED, "slow down", retry)
    status = decode_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", [(STATUS_DETAILS_KEY, raw)])
    assert status.retry_delay_s == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7),
        ("0", 0),
        ("-1", None),
        ("1.5", None),
        (" 3", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("٣", None),
        ("9" * 13, None),
        (b"5", 5),
    ],
)
def test_retry_after_is_plain_delay_seconds_only(value: str | bytes, expected: int | None) -> None:
    status = decode_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "m", [("retry-after", value)])
    assert status.retry_after_s == expected


def test_lists_are_bounded() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f"f{i}", description="d")
            for i in range(5 * MAX_ITEMS)
        ]
    )
    raw = _status_bytes(code_pb2.INVALID_ARGUMENT, "m", bad, bad)
    status = decode_status(grpc.StatusCode.INVALID_ARGUMENT, "m", [(STATUS_DETAILS_KEY, raw)])
    assert len(status.field_violations) == MAX_ITEMS


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=512),
    retry_after=st.one_of(st.text(max_size=20), st.binary(max_size=20)),
    code=st.sampled_from(list(grpc.StatusCode)),
)
def test_never_raises_on_arbitrary_trailers(
    raw: bytes, retry_after: str | bytes, code: grpc.StatusCode
) -> None:
    status = decode_status(code, "m", [(STATUS_DETAILS_KEY, raw), ("retry-after", retry_after)])
    assert status.code is code


@settings(max_examples=200, deadline=None)
@given(
    details=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "type.googleapis.com/google.rpc.ErrorInfo",
                    "type.googleapis.com/google.rpc.BadRequest",
                    "type.googleapis.com/google.rpc.RetryInfo",
                    "type.googleapis.com/google.rpc.QuotaFailure",
                    "type.googleapis.com/x.Unknown",
                ]
            ),
            st.binary(max_size=64),
        ),
        max_size=8,
    )
)
def test_never_raises_on_arbitrary_details(details: list[tuple[str, bytes]]) -> None:
    raw = status_pb2.Status(
        code=code_pb2.ABORTED, message="m", details=[any_pb2.Any(type_url=t, value=v) for t, v in details]
    ).SerializeToString()
    status = decode_status(grpc.StatusCode.ABORTED, "m", [(STATUS_DETAILS_KEY, raw)])
    assert status.code == grpc.StatusCode.ABORTED and status.details_problem is None


async def test_decodes_a_real_calls_error_over_mtls(trading: RunningTrading) -> None:
    async with trading.channel("ops") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trading.stub(channel).PlaceOrder(
                trading_pb2.PlaceOrderRequest(account_id="acct-1", client_order_id="c-1", symbol="nope"),
                timeout=10,
            )
    status = rich_status(err.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.reason is not None and status.error_info is not None
    assert status.error_info.domain == "tradeguard.dev"
    assert status.field_violations and all(v.field for v in status.field_violations)
    assert status.details_problem is None
