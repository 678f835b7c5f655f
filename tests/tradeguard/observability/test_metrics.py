from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from tests.support import free_port
from tradeguard.observability.metrics import RpcMetrics, start_metrics_server


def test_rpc_metrics_counts_and_buckets() -> None:
    registry = CollectorRegistry()
    auth = RpcMetrics("auth", registry=registry)
    audit = RpcMetrics("audit", registry=registry)  # a second service in the same registry is fine
    auth.observe("/a.v1.Auth/Verify", "OK", 0.0003)
    auth.observe("/a.v1.Auth/Verify", "OK", 0.002)
    auth.observe("/a.v1.Auth/Verify", "UNAUTHENTICATED", 0.001)
    audit.observe("/a.v1.Audit/Append", "INTERNAL", 1.5)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    verify = {"service": "auth", "method": "/a.v1.Auth/Verify"}
    assert value("tradeguard_rpc_requests_total", code="OK", **verify) == 2
    assert value("tradeguard_rpc_requests_total", code="UNAUTHENTICATED", **verify) == 1
    assert value("tradeguard_rpc_errors_total", code="UNAUTHENTICATED", **verify) == 1
    assert value("tradeguard_rpc_errors_total", code="OK", **verify) is None
    assert value("tradeguard_rpc_duration_seconds_count", **verify) == 3
    assert value("tradeguard_rpc_duration_seconds_bucket", le="0.0005", **verify) == 1
    assert value("tradeguard_rpc_duration_seconds_bucket", le="0.001", **verify) == 2
    append = {"service": "audit", "method": "/a.v1.Audit/Append"}
    assert value("tradeguard_rpc_errors_total", code="INTERNAL", **append) == 1
    assert value("tradeguard_rpc_duration_seconds_bucket", le="2.5", **append) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.10", "example.com", ""])
def test_metrics_server_refuses_non_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        start_metrics_server(0, host=host, registry=CollectorRegistry())


def test_metrics_server_serves_on_loopback() -> None:
    registry = CollectorRegistry()
    RpcMetrics("ratelimit", registry=registry).observe("/r.v1.RateLimit/Check", "OK", 0.0001)
    port = free_port()
    start_metrics_server(port, registry=registry)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert (
        'tradeguard_rpc_requests_total{code="OK",method="/r.v1.RateLimit/Check",service="ratelimit"} 1.0'
        in body
    )
