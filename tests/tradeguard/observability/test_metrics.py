from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from tests.support import free_port
from tradeguard.observability.metrics import MetricsServer, RpcMetrics, start_metrics_server
from tradeguard.testing import eventually


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


def test_rpc_duration_buckets_are_cumulative_with_bounds_inclusive_and_an_inf_bucket() -> None:
    registry = CollectorRegistry()
    metrics = RpcMetrics("echo", registry=registry)
    for seconds in (0.0005, 0.0005001, 10.0, 11.0):  # on a bound, just above it, on the last bound, past it
        metrics.observe("/e.v1.Echo/Echo", "OK", seconds)
    labels = {"service": "echo", "method": "/e.v1.Echo/Echo"}

    def bucket(le: str) -> float | None:
        return registry.get_sample_value("tradeguard_rpc_duration_seconds_bucket", {**labels, "le": le})

    assert bucket("0.00025") == 0
    assert bucket("0.0005") == 1  # le: less than or equal
    assert bucket("0.001") == 2
    assert bucket("10.0") == 3
    assert bucket("+Inf") == 4
    assert registry.get_sample_value("tradeguard_rpc_duration_seconds_count", labels) == 4
    assert registry.get_sample_value("tradeguard_rpc_duration_seconds_sum", labels) == pytest.approx(
        21.0010001
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.10", "example.com", ""])
def test_metrics_server_refuses_non_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        start_metrics_server(0, host=host, registry=CollectorRegistry())


LINE = 'tradeguard_rpc_requests_total{code="OK",method="/r.v1.RateLimit/Check",service="ratelimit"} 1.0'


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


@contextlib.contextmanager
def _server(**options: float) -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    RpcMetrics("ratelimit", registry=registry).observe("/r.v1.RateLimit/Check", "OK", 0.0001)
    server = start_metrics_server(0, registry=registry, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


def test_metrics_server_serves_on_loopback() -> None:
    registry = CollectorRegistry()
    RpcMetrics("ratelimit", registry=registry).observe("/r.v1.RateLimit/Check", "OK", 0.0001)
    port = free_port()
    server = start_metrics_server(port, registry=registry)
    try:
        assert server.port == port
        assert LINE in _scrape(port)
    finally:
        server.close()
    with pytest.raises(OSError):  # closed: the port no longer answers
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_only_get_metrics_is_served() -> None:
    with _server() as server:
        with pytest.raises(urllib.error.HTTPError) as other:
            _scrape(server.port, "/")
        assert other.value.code == 404
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as post:
            urllib.request.urlopen(request, timeout=10)
        assert post.value.code == 405
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 431")


def _half_sent(port: int) -> socket.socket:
    """A connection that starts a request and never finishes it."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    conn.setblocking(False)
    return conn


def _closed_by_server(conn: socket.socket) -> bool:
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def _threads() -> int:
    return threading.active_count()


async def test_half_sent_requests_hold_no_threads_are_bounded_and_metrics_still_answer() -> None:
    # the probe: 500 half-sent requests made 500 threads, one still open after 250 s
    with _server(read_timeout_s=60.0, max_connections=8) as server:
        await asyncio.to_thread(lambda: None)  # the test's own executor thread, before counting
        baseline = _threads()
        conns = [_half_sent(server.port) for _ in range(300)]
        try:
            # all but the newest 8 are closed at once, long before the read timeout
            await eventually(lambda: sum(_closed_by_server(c) for c in conns[:-8]) == 292, within_s=30)
            assert server.open_connections <= 8
            assert _threads() <= baseline
            # a scrape still gets through while half-sent connections hold every slot
            assert LINE in await asyncio.to_thread(_scrape, server.port)
            assert _threads() <= baseline
        finally:
            for c in conns:
                c.close()


async def test_a_half_sent_or_trickled_request_is_closed_after_the_read_timeout() -> None:
    with _server(read_timeout_s=1.0) as server:
        idle = _half_sent(server.port)
        trickle = _half_sent(server.port)
        try:
            assert not _closed_by_server(idle)

            def trickled_and_closed() -> bool:
                # one more header byte each time: a per-read timeout would never fire
                with contextlib.suppress(OSError):
                    trickle.send(b"a")
                return _closed_by_server(trickle)

            await eventually(lambda: _closed_by_server(idle), within_s=30)
            await eventually(trickled_and_closed, within_s=30)
            await eventually(lambda: server.open_connections == 0, within_s=30)
            assert LINE in await asyncio.to_thread(_scrape, server.port)
        finally:
            idle.close()
            trickle.close()
