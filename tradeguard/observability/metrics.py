"""Prometheus RPC metrics and a loopback-only, bounded metrics endpoint."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DURATION_BUCKETS", "MetricsServer", "RpcMetrics", "start_metrics_server"]

#: 100 µs .. 10 s: a bare call here is ~0.4 ms, a call with nested RPCs a few ms, a slow backend seconds.
DURATION_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _Histogram:
    """One (service, method)'s durations: a count per bucket (not cumulative; the last one is +Inf), their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0


_REQUESTS: Final = ("tradeguard_rpc_requests", "RPCs handled, by final status code")
_ERRORS: Final = ("tradeguard_rpc_errors", "RPCs that ended with a status code other than OK")
_DURATION: Final = ("tradeguard_rpc_duration_seconds", "Server-side RPC handling time")
_BOUNDS: Final = [repr(float(bound)) for bound in DURATION_BUCKETS] + ["+Inf"]  # Prometheus' le values


class _RpcCollector(Collector):
    """Every service's RPC series of one registry, counted in plain cells under one lock and rendered as the
    Prometheus families only when scraped. prometheus_client's Counter and Histogram cost about 200 Python
    opcodes per RPC (a lock per value, a loop over the buckets); this costs a bisect and four additions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], list[int]] = {}
        self.errors: dict[tuple[str, str, str], list[int]] = {}
        self.durations: dict[tuple[str, str], _Histogram] = {}

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(*_REQUESTS, labels=("service", "method", "code"))
        yield CounterMetricFamily(*_ERRORS, labels=("service", "method", "code"))
        yield HistogramMetricFamily(*_DURATION, labels=("service", "method"))

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            requests = [(key, cell[0]) for key, cell in self.requests.items()]
            errors = [(key, cell[0]) for key, cell in self.errors.items()]
            durations = [(key, list(h.counts), h.sum) for key, h in self.durations.items()]
        for (name, help_text), series in ((_REQUESTS, requests), (_ERRORS, errors)):
            family = CounterMetricFamily(name, help_text, labels=("service", "method", "code"))
            for labels, value in series:
                family.add_metric(labels, value)
            yield family
        histogram = HistogramMetricFamily(*_DURATION, labels=("service", "method"))
        for series_labels, counts, total in durations:
            histogram.add_metric(
                series_labels, list(zip(_BOUNDS, itertools.accumulate(counts), strict=True)), sum_value=total
            )
        yield histogram


# One collector per registry, shared by every RpcMetrics (the service is a label), so that several services in
# one process (embedded mode, tests) do not collide on registration.
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _RpcCollector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> _RpcCollector:
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _RpcCollector()
            registry.register(collector)
            _collectors[registry] = collector
        return collector


class RpcMetrics:
    """Per-service RPC metrics.

    ``tradeguard_rpc_requests_total`` and ``tradeguard_rpc_errors_total`` (``{service,method,code}``),
    ``tradeguard_rpc_duration_seconds`` (``{service,method}``, buckets `DURATION_BUCKETS`).
    """

    __slots__ = ("_children", "_collector", "_lock", "service")

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self._collector = _collector_for(registry if registry is not None else REGISTRY)
        self._lock = self._collector.lock
        # (method, code) -> (requests cell, errors cell or None, durations): label lookups once.
        self._children: dict[tuple[str, str], tuple[list[int], list[int] | None, _Histogram]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            children = self._resolve(method, code)
        requests, errors, duration = children
        bucket = bisect_left(DURATION_BUCKETS, seconds)  # the first bound >= seconds, as Prometheus' le
        with self._lock:  # handlers may run in executor threads too
            requests[0] += 1
            if errors is not None:
                errors[0] += 1
            duration.counts[bucket] += 1
            duration.sum += seconds

    def _resolve(self, method: str, code: str) -> tuple[list[int], list[int] | None, _Histogram]:
        collector = self._collector
        with self._lock:
            requests = collector.requests.setdefault((self.service, method, code), [0])
            errors = None if code == "OK" else collector.errors.setdefault((self.service, method, code), [0])
            duration = collector.durations.setdefault((self.service, method), _Histogram())
        children = (requests, errors, duration)
        # Method names come from registered handlers only (unknown methods never reach the chain), so this
        # stays small; the bound guards against surprises anyway.
        if len(self._children) < 10_000:
            self._children[(method, code)] = children
        return children


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: A request that has not arrived whole after this long is dropped (it was 'never': one thread held per
#: half-sent request). Covers the whole request head, so a client trickling a byte at a time is dropped too.
READ_TIMEOUT_S: Final = 5.0
#: Connections open at once; past it the oldest one still sending its request is closed at once.
MAX_CONNECTIONS: Final = 16
#: A Prometheus scrape's request head is a few hundred bytes.
MAX_REQUEST_BYTES: Final = 8192
_WRITE_TIMEOUT_S: Final = 10.0


class MetricsServer:
    """Prometheus text exposition over plain HTTP on a loopback address: `GET /metrics` only.

    These ports are the one plain-text exception to the mesh's TLS: loopback only (anything beyond the host
    scrapes through an agent), and bounded so that a local process cannot exhaust the service through them:
    one thread for all its connections (an event loop of its own, not a thread per connection), at most
    `max_connections` open at once, `read_timeout_s` for a whole request head of at most `max_request_bytes`,
    one request per connection. When all slots are taken, a new connection takes the slot of the oldest
    connection still sending its request, which is closed at once: idle or half-sent connections cannot keep
    a scrape out for longer than it takes to open a fresh one.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        registry: CollectorRegistry | None = None,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(f"metrics server must bind a loopback address, not {host!r}")
        if not read_timeout_s > 0 or max_connections < 1 or max_request_bytes < 64:
            raise ValueError(
                "read_timeout_s must be positive, max_connections at least 1, max_request_bytes 64+"
            )
        self._registry = registry if registry is not None else REGISTRY
        self._read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._max_request_bytes = max_request_bytes
        address = "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # bound here, so that a taken port fails the caller at once
        self._socket = socket.create_server((address, port), family=family, backlog=64)
        self.port: int = self._socket.getsockname()[1]
        # connection task -> True while it is still reading its request (insertion order: oldest first)
        self._connections: dict[asyncio.Task[None], bool] = {}
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"metrics:{self.port}", daemon=True)
        self._failed: BaseException | None = None
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        """Stop serving: the listening socket and every connection are closed; the thread ends."""
        if self._stopped:
            return
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # -- the server's own thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._accepted, sock=self._socket, limit=self._max_request_bytes)
            )
        except BaseException as exc:
            self._failed = exc
            self._started.set()
            loop.close()
            self._socket.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*self._connections, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            oldest = next((t for t, reading in self._connections.items() if reading), None)
            if oldest is None:  # every slot is answering a request: this one waits for none
                writer.transport.abort()
                return
            oldest.cancel()
            del self._connections[oldest]
        self._connections[task] = True
        answered = False
        try:
            answered = await self._serve(reader, writer, task)
        except (
            asyncio.CancelledError,
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            ValueError,
        ):
            pass  # evicted, too slow, gone or malformed: closed below, nothing to answer
        finally:
            self._connections.pop(task, None)
            if answered:
                writer.close()  # everything written was taken by the kernel (see _respond): a clean close
            else:
                writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[None]
    ) -> bool:
        """Read one request and answer it; True once the answer is written."""
        try:
            async with asyncio.timeout(self._read_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return await self._respond(writer, 431, "Request Header Fields Too Large", b"")
        self._connections[task] = False  # answering: no longer evicted by a newcomer
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return await self._respond(writer, 400, "Bad Request", b"")
        if parts[0] != "GET":
            return await self._respond(writer, 405, "Method Not Allowed", b"", extra=b"Allow: GET\r\n")
        if parts[1].split("?", 1)[0] != "/metrics":
            return await self._respond(writer, 404, "Not Found", b"")
        return await self._respond(writer, 200, "OK", generate_latest(self._registry))

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, reason: str, body: bytes, extra: bytes = b""
    ) -> bool:
        content_type = CONTENT_TYPE_LATEST if status == 200 else "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode("latin-1")
        writer.transport.set_write_buffer_limits(high=0)  # drain() returns once the kernel has it all
        writer.write(head + extra + b"\r\n" + body)
        async with asyncio.timeout(_WRITE_TIMEOUT_S):  # a client that does not read is dropped
            await writer.drain()
        return True


def start_metrics_server(
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    read_timeout_s: float = READ_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve Prometheus text exposition on ``host:port`` (loopback addresses only) from one daemon thread.

    Metrics reveal method names and traffic; anything beyond the host must scrape through a sidecar/agent.
    See `MetricsServer` for the bounds. `close()` the result to stop it."""
    return MetricsServer(port, host, registry, read_timeout_s=read_timeout_s, max_connections=max_connections)
