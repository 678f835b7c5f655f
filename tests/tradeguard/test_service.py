"""The service runner: one way to declare, start, serve and stop a service; usage and settings errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.trading.service import SERVICE as TRADING
from services.trading.servicer import TradingServicer
from services.trading.settings import Settings
from services.trading.store import OrderStore
from tests.support import free_port
from tradeguard.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import ServerConfig
from tradeguard.registry import SERVICES, SUITE
from tradeguard.rpc.handlers import Layer
from tradeguard.service import Assembly, Wiring, read_settings, start
from tradeguard.settings import SettingsError
from tradeguard.testing import eventually, running_service
from tradeguard.trading.v1 import trading_pb2

ROOT = Path(__file__).resolve().parents[2]


def _python_m(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("name", SUITE)
def test_help_prints_usage_and_starts_nothing(name: str) -> None:
    done = _python_m(SERVICES[name].module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {SERVICES[name].module}")
    assert SERVICES[name].full_name in done.stdout


@pytest.mark.parametrize("name", SUITE)
def test_an_unknown_argument_is_refused_with_usage(name: str) -> None:
    done = _python_m(SERVICES[name].module, "--port", "1")
    assert done.returncode == 2
    assert "error: unknown argument '--port'" in done.stderr and "usage:" in done.stderr


def test_a_bad_setting_is_one_line_naming_the_variable_not_a_traceback(tmp_path: Path) -> None:
    done = _python_m(
        "services.trading", env={"TRADEGUARD_HOME": str(tmp_path), "TRADEGUARD_TRADING_PORT": "x"}
    )
    assert done.returncode == 2
    assert "TRADEGUARD_TRADING_PORT must be an integer between 0 and 65535, got 'x'" in done.stderr
    assert "Traceback" not in done.stderr


def test_settings_default_to_a_sqlite_file_per_service_and_refuse_other_urls(tmp_path: Path) -> None:
    settings = read_settings(TRADING, {"TRADEGUARD_HOME": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'trading.db'}"
    assert settings.server.port == SERVICES["trading"].port
    with pytest.raises(SettingsError, match="TRADEGUARD_TRADING_DATABASE_URL must start with"):
        read_settings(
            TRADING, {"TRADEGUARD_HOME": str(tmp_path), "TRADEGUARD_TRADING_DATABASE_URL": "mysql://x"}
        )


def _settings(paths: pki.PkiPaths) -> Settings:
    home = paths.home
    return Settings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0, drain_s=0.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
    )


async def test_started_service_serves_runs_its_tasks_and_closes_in_reverse_order(
    pki_paths: pki.PkiPaths,
) -> None:
    events: list[str] = []
    task_running = asyncio.Event()

    async def build(wiring: Wiring[Settings, OrderStore]) -> Assembly:
        assembly = await TRADING.build(wiring)

        async def ticker() -> None:
            task_running.set()
            try:
                await asyncio.Event().wait()
            finally:
                events.append("task cancelled")

        async def close_first() -> None:
            events.append("closer 1")

        async def close_second() -> None:
            events.append("closer 2")

        return replace(assembly, tasks=[ticker], closers=[close_first, close_second])

    declaration = replace(TRADING, build=build)
    async with running_service(declaration, _settings(pki_paths), pki_paths) as service:
        await task_running.wait()
        async with service.channel("ops") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=TRADING.registered.full_name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        store = service.running.store
    assert events == ["task cancelled", "closer 2", "closer 1"]
    with pytest.raises(RuntimeError):  # the store was closed
        await store.get("acct-1", "ord_00000000000000000000000001")


async def test_a_failed_build_closes_the_store_and_serves_nothing(pki_paths: pki.PkiPaths) -> None:
    closed: list[bool] = []

    async def opening(path: Path) -> OrderStore:
        store = await TRADING.stores.sqlite(path)
        original = store.close

        async def close() -> None:
            closed.append(True)
            await original()

        store.close = close  # type: ignore[method-assign]
        return store

    async def failing(wiring: Wiring[Settings, OrderStore]) -> Assembly:
        raise RuntimeError("build failed")

    declaration = replace(TRADING, build=failing, stores=replace(TRADING.stores, sqlite=opening))
    with pytest.raises(RuntimeError, match="build failed"):
        await start(declaration, _settings(pki_paths))
    assert closed == [True]


async def test_the_servicer_is_what_build_returned(pki_paths: pki.PkiPaths) -> None:
    async with running_service(TRADING, _settings(pki_paths), pki_paths) as service:
        assert isinstance(service.running.assembly.servicer, TradingServicer)
        async with service.channel("ops") as channel:
            from tradeguard.trading.v1 import trading_pb2_grpc

            stub = trading_pb2_grpc.TradingServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetOrder(trading_pb2.GetOrderRequest(account_id="acct-1", order_id="ord_x"))
            # the declaration's permissions mounted the guard: a call without credentials never reaches the core
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_service_exports_traces_when_an_otlp_endpoint_is_set(pki_paths: pki.PkiPaths) -> None:
    """The key vault once mounted the tracing interceptor without configuring a tracer provider, so its spans
    went nowhere. Through the runner every service configures tracing: its exporter connects to the endpoint."""
    connected = asyncio.Event()

    async def collector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        writer.close()

    listener = await asyncio.start_server(collector, "127.0.0.1", 0)
    otlp_port = listener.sockets[0].getsockname()[1]
    port = free_port()
    env = {
        **os.environ,
        "TRADEGUARD_HOME": str(pki_paths.home),
        "TRADEGUARD_KEYVAULT_PORT": str(port),
        "TRADEGUARD_OTLP_ENDPOINT": f"https://127.0.0.1:{otlp_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.keyvault", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with MeshChannel(f"127.0.0.1:{port}", "keyvault", tls.Workload.of(pki_paths, "ops")) as channel:
            stub = keyvault_pb2_grpc.KeyVaultServiceStub(channel)

            async def answered() -> bool:
                try:
                    await stub.GetSealStatus(keyvault_pb2.GetSealStatusRequest(), timeout=5)
                except grpc.aio.AioRpcError:
                    return False
                return True

            async with asyncio.timeout(60):
                while not await answered():  # noqa: ASYNC110 - polls a process that is starting
                    await asyncio.sleep(0.05)
            await eventually(connected.is_set, within_s=60)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        listener.close()
        await listener.wait_closed()


async def test_a_service_layer_sees_the_decoded_request_and_its_raw_bytes(pki_paths: pki.PkiPaths) -> None:
    seen: list[tuple[object, bytes]] = []

    class Recorder(Layer):
        async def before(self, context: object, request: object, raw: bytes) -> None:
            seen.append((request, raw))

    async def build(wiring: Wiring[Settings, OrderStore]) -> Assembly:
        return replace(await TRADING.build(wiring), layers=[Recorder()])

    request = trading_pb2.GetOrderRequest(account_id="acct-1", order_id="ord_00000000000000000000000001")
    # Unknown fields survive on the wire: the layer gets the bytes as sent, never a re-serialisation.
    raw = request.SerializeToString() + b"\xa0\x06\x01"
    # without the guard (permissions=None) the layer runs first; the servicer then refuses to act for nobody
    unguarded = replace(TRADING, build=build, permissions=None)
    async with running_service(unguarded, _settings(pki_paths), pki_paths) as service:
        channel = service.channel("ops")
        async with channel:
            call = channel.unary_unary(
                "/tradeguard.trading.v1.TradingService/GetOrder",
                request_serializer=None,
                response_deserializer=None,
            )
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await call(raw)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [(decoded, got)] = seen
    assert got == raw
    assert isinstance(decoded, trading_pb2.GetOrderRequest)
    assert (decoded.account_id, decoded.order_id) == (request.account_id, request.order_id)
