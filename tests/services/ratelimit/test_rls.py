"""Envoy's ShouldRateLimit on the rate-limit service, with real `RateLimitRequest` messages (xds-protos) as the
edge's config builds them (deploy/envoy/edge.yaml: principal, key, tier, method; "-" for an absent key or tier),
over mutual TLS as the `edge` workload: OK then OVER_LIMIT with statuses and the RateLimit-* / Retry-After
headers, descriptors mapped onto the same subjects, tiers and limits as CheckQuota, validation naming the
descriptor, and only the edge admitted."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as descriptors_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

from services.ratelimit.model import Decision, Limit, LimitState
from services.ratelimit.rls import current_limit, tightest
from tests.services.ratelimit.test_servicer import (
    PLACE,
    SECOND_US,
    Ratelimit,
    check,
    limits_by_name,
    ratelimit_service,
    refused,
)
from tradeguard.mesh import pki
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb

Response = Any  # rls_pb2.RateLimitResponse (xds-protos ships no type stubs)
Unit = rls_pb2.RateLimitResponse.RateLimit
OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


@pytest.fixture
async def ratelimit(pki_paths: pki.PkiPaths) -> AsyncIterator[Ratelimit]:
    async with ratelimit_service(pki_paths) as running:
        yield running


def descriptor(
    principal: str | None = "u-1",
    key: str | None = "-",
    tier: str | None = "-",
    method: str | None = PLACE,
    *,
    hits: int | None = None,
    **more: str,
) -> descriptors_pb2.RateLimitDescriptor:
    """One descriptor in the edge's order; None leaves an entry out."""
    entries = [
        descriptors_pb2.RateLimitDescriptor.Entry(key=name, value=value)
        for name, value in (
            ("principal", principal),
            ("key", key),
            ("tier", tier),
            ("method", method),
            *more.items(),
        )
        if value is not None
    ]
    out = descriptors_pb2.RateLimitDescriptor(entries=entries)
    if hits is not None:
        out.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return out


def request(
    *descriptors: descriptors_pb2.RateLimitDescriptor, domain: str = "tradeguard", hits: int = 0
) -> Any:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits)


async def should(ratelimit: Ratelimit, message: Any, caller: str = "edge") -> Response:
    async with ratelimit.service.channel(caller) as channel:
        reply: Response = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
            message, timeout=30
        )
        return reply


def headers(response: Response) -> dict[str, str]:
    return {h.key: h.value for h in response.response_headers_to_add}


async def quota(ratelimit: Ratelimit, subject: str, operation: str = PLACE) -> pb.QuotaDecision:
    async with ratelimit.stub() as stub:
        return (await stub.GetQuota(pb.GetQuotaRequest(check=check(subject, operation)))).decision


async def test_ok_then_over_limit_with_statuses_and_headers(ratelimit: Ratelimit) -> None:
    first = await should(ratelimit, request(descriptor(key="tgk_edge1")))
    assert first.overall_code == OK
    (status,) = first.statuses
    assert status.code == OK
    # the tightest enforcing limit: orders/per-second (2 per 1 s), 1 left; the shadow per-10s never reported
    assert status.current_limit.name == "orders/per-second: 2 per 1s"
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (2, Unit.SECOND)
    assert status.limit_remaining == 1
    until_reset_us = status.duration_until_reset.ToMicroseconds()
    assert 0 < until_reset_us <= 2 * SECOND_US
    assert headers(first) == {
        "ratelimit-limit": "2",
        "ratelimit-remaining": "1",
        "ratelimit-reset": str(math.ceil(until_reset_us / SECOND_US)),
    }

    second = await should(ratelimit, request(descriptor(key="tgk_edge1")))
    assert second.overall_code == OK and second.statuses[0].limit_remaining == 0
    assert headers(second)["ratelimit-remaining"] == "0"

    over = await should(ratelimit, request(descriptor(key="tgk_edge1")))
    assert over.overall_code == OVER_LIMIT
    (status,) = over.statuses
    assert status.code == OVER_LIMIT and status.limit_remaining == 0
    assert status.current_limit.name == "orders/per-second: 2 per 1s"
    sent = headers(over)
    assert sent["ratelimit-limit"] == "2" and sent["ratelimit-remaining"] == "0"
    # the 429's body: the JSON of the google.rpc.Status a gRPC client gets (as the edge's transcoder prints one)
    assert (sent["content-type"], sent["cache-control"]) == ("application/json", "no-store")
    body = json.loads(over.raw_body)
    assert (body["code"], body["message"]) == (8, "orders/per-second: 2 per 1s")
    info, retry, failure = body["details"]
    assert (info["reason"], info["domain"]) == ("RATE_LIMITED", "tradeguard.dev")
    assert retry["retry_delay"] == f"{sent['retry-after']}s"
    assert failure["violations"] == [
        {"subject": "key:tgk_edge1", "description": "orders/per-second: 2 per 1s"}
    ]
    async with ratelimit.stub() as stub:  # the same request as a CheckQuota peek: its retry delay
        peek = (await stub.GetQuota(pb.GetQuotaRequest(check=check("key:tgk_edge1")))).decision
    assert sent["retry-after"] == str(max(1, math.ceil(peek.retry_after.ToMicroseconds() / SECOND_US)))

    ratelimit.clock.advance(peek.retry_after.ToMicroseconds())
    assert (await should(ratelimit, request(descriptor(key="tgk_edge1")))).overall_code == OK


async def test_descriptors_map_onto_subjects_tiers_and_operations(ratelimit: Ratelimit) -> None:
    await should(ratelimit, request(descriptor(principal="u-key", key="tgk_k2")))  # a signed call: its key
    assert limits_by_name(await quota(ratelimit, "key:tgk_k2"))["orders/per-day"].remaining == 99
    assert limits_by_name(await quota(ratelimit, "user:u-key"))["orders/per-day"].remaining == 100

    # a bearer token: its user, whether the key is "-", absent or empty (the third call is the user's third
    # within its 2-per-second limit)
    assert (await should(ratelimit, request(descriptor(principal="u-jwt", key="-")))).overall_code == OK
    absent = request(descriptor(principal="u-jwt", key=None, tier=None))
    assert (await should(ratelimit, absent)).overall_code == OK
    over = await should(ratelimit, request(descriptor(principal="u-jwt", key="")))
    assert over.overall_code == OVER_LIMIT
    assert limits_by_name(await quota(ratelimit, "user:u-jwt"))["orders/per-day"].remaining == 98

    pro = await should(ratelimit, request(descriptor(principal="u-pro", tier="pro")))
    assert pro.statuses[0].current_limit.name == "requests/per-minute: 100 per 1m"
    assert pro.statuses[0].current_limit.unit == Unit.MINUTE and pro.statuses[0].limit_remaining == 99

    # the method is the operation (a query string dropped); ListOrders weighs 5 against requests/per-minute
    listed = await should(
        ratelimit,
        request(
            descriptor(principal="u-list", method="/tradeguard.trading.v1.TradingService/ListOrders?x=1")
        ),
    )
    assert listed.statuses[0].current_limit.name == "requests/per-minute: 10 per 1m"
    assert listed.statuses[0].limit_remaining == 5


async def test_hits_addend_is_the_cost(ratelimit: Ratelimit) -> None:
    both = await should(ratelimit, request(descriptor(principal="u-hits"), hits=2))
    assert both.overall_code == OK and both.statuses[0].limit_remaining == 0  # 2 of orders/per-second
    ratelimit.clock.advance_s(2)
    own = await should(ratelimit, request(descriptor(principal="u-hits2", hits=3), hits=1))
    assert own.overall_code == OVER_LIMIT  # the descriptor's own hits_addend (3 > 2) wins over the request's
    assert own.statuses[0].current_limit.name == "orders/per-second: 2 per 1s"
    assert headers(own)["retry-after"] == "1"  # never fits: the refusing limit's window
    zero = await should(ratelimit, request(descriptor(principal="u-hits3"), hits=0))
    assert zero.statuses[0].limit_remaining == 1  # 0 means 1


async def test_all_descriptors_of_a_request_go_to_the_store_together(ratelimit: Ratelimit) -> None:
    await should(ratelimit, request(descriptor(principal="u-full"), hits=2))  # its per-second limit used up
    before = len(ratelimit.counters.batches)
    mixed = await should(
        ratelimit,
        request(
            descriptor(principal="u-full"),
            descriptor(principal="u-free"),
            descriptor(principal="u-pro", tier="pro"),
        ),
    )
    assert ratelimit.counters.batches[before:] == [3]  # one store round trip
    assert mixed.overall_code == OVER_LIMIT
    assert [s.code for s in mixed.statuses] == [OVER_LIMIT, OK, OK]
    sent = headers(mixed)  # the headers speak of the refusing limit
    assert sent["ratelimit-limit"] == "2" and sent["ratelimit-remaining"] == "0" and "retry-after" in sent
    # the allowed descriptors were counted (each descriptor is its own check, as in envoyproxy/ratelimit)
    assert limits_by_name(await quota(ratelimit, "user:u-free"))["orders/per-day"].remaining == 99


async def test_with_the_store_down_fail_closed_limits_answer_over_limit(ratelimit: Ratelimit) -> None:
    ratelimit.counters.down = True
    closed = await should(ratelimit, request(descriptor(method="/test.v1.Fail/Closed")))
    opened = await should(ratelimit, request(descriptor(method="/test.v1.Fail/Open")))
    assert closed.overall_code == OVER_LIMIT and headers(closed)["retry-after"] == "1"
    assert closed.statuses[0].limit_remaining == 0
    assert closed.statuses[0].duration_until_reset.ToMicroseconds() == 3600 * SECOND_US  # unknown: the window
    assert opened.overall_code == OK and "retry-after" not in headers(opened)


async def test_an_unknown_domain_or_a_bad_descriptor_is_refused_naming_it(ratelimit: Ratelimit) -> None:
    async with ratelimit.service.channel("edge") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        for domain in ("", "other", "Tradeguard"):
            code, fields = await refused(stub.ShouldRateLimit(request(descriptor(), domain=domain)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"domain"}
        code, fields = await refused(stub.ShouldRateLimit(request()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"descriptors"}

        with_limit = descriptor()
        with_limit.limit.requests_per_unit = 1000000
        bad = request(
            descriptor(),  # fine
            descriptor(principal=None),
            descriptor(method=None),
            descriptor(principal=""),
            descriptor(generic_key="x"),
            with_limit,
            descriptor(principal="a b", method="/has space"),
        )
        code, fields = await refused(stub.ShouldRateLimit(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "principal" in fields["descriptors[1].entries"] and "method" in fields["descriptors[2].entries"]
    assert "principal" in fields["descriptors[3].entries"]
    assert "generic_key" in fields["descriptors[4].entries[4].key"]
    assert "limits file" in fields["descriptors[5].limit"]
    assert {"descriptors[6].subject", "descriptors[6].operation"} <= set(fields)
    assert "descriptors[0].entries" not in fields
    assert ratelimit.counters.batches == []  # nothing was counted


async def test_only_the_edge_may_ask(ratelimit: Ratelimit) -> None:
    for caller in ("ops", "trading", "monitor", "auth"):
        async with ratelimit.service.channel(caller) as channel:
            code, _ = await refused(
                rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request(descriptor()))
            )
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert ratelimit.counters.batches == []


# --- the limit as Envoy's RateLimit --------------------------------------------------------------------------


def _state(
    window_s: int, count: int = 50, *, remaining: int = 0, exceeded: bool = False, shadow: bool = False
) -> LimitState:
    limit = Limit(name=f"w{window_s}", group="g", count=count, window_us=window_s * SECOND_US, shadow=shadow)
    return LimitState(limit=limit, remaining=remaining, reset_us=None, exceeded=exceeded)


@pytest.mark.parametrize(
    ("window_s", "unit"),
    [
        (1, Unit.SECOND),
        (10, Unit.SECOND),
        (60, Unit.MINUTE),
        (90, Unit.MINUTE),
        (3600, Unit.HOUR),
        (86_400, Unit.DAY),
        (7 * 86_400, Unit.DAY),
    ],
)
def test_current_limit_unit_is_exact_or_the_largest_unit_within_the_window(window_s: int, unit: int) -> None:
    reported = current_limit(_state(window_s))
    assert reported.unit == unit and reported.requests_per_unit == 50
    assert reported.name == _state(window_s).limit.description  # the exact window, always


def test_current_limit_caps_counts_at_uint32() -> None:
    assert current_limit(_state(86_400, count=10**12)).requests_per_unit == 2**32 - 1


def test_tightest_prefers_a_refusing_limit_then_the_fewest_remaining_and_ignores_shadow() -> None:
    refusing = _state(1, count=10, remaining=5, exceeded=True)
    fewer = _state(60, count=100, remaining=3)
    shadow = _state(10, remaining=0, exceeded=True, shadow=True)
    decision = Decision(allowed=False, tier="t", limits=(fewer, shadow, refusing), now_us=0)
    assert tightest(decision) is refusing
    allowed = Decision(allowed=True, tier="t", limits=(_state(60, remaining=9), fewer, shadow), now_us=0)
    assert tightest(allowed) is fewer
    assert tightest(Decision(allowed=True, tier="t", limits=(shadow,), now_us=0)) is None
    assert tightest(Decision(allowed=True, tier="t", limits=(), now_us=0)) is None
