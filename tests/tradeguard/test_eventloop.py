"""The services' event loop: uvloop by default, asyncio's by TRADEGUARD_EVENT_LOOP, anything else refused; the
kit's mutual-TLS chain works on both, and a service started as a process runs on the configured one."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.support import free_port
from tradeguard import eventloop
from tradeguard.echo import running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.mesh import pki
from tradeguard.settings import SettingsError
from tradeguard.testing import eventually

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_is_uvloop_and_asyncio_is_chosen_by_name() -> None:
    assert eventloop.from_env({}) == "uvloop"
    assert eventloop.from_env({"TRADEGUARD_EVENT_LOOP": "asyncio"}) == "asyncio"
    assert eventloop.from_env({"TRADEGUARD_EVENT_LOOP": "uvloop"}) == "uvloop"


@pytest.mark.parametrize("value", ["trio", "UVLOOP", "uvloop ", "1"])
def test_an_unknown_loop_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="TRADEGUARD_EVENT_LOOP must be one of uvloop, asyncio"):
        eventloop.from_env({"TRADEGUARD_EVENT_LOOP": value})


def test_run_refuses_an_unknown_loop_without_leaving_the_coroutine_unawaited() -> None:
    async def main() -> None:
        raise AssertionError("must not run")

    coroutine = main()
    with pytest.raises(ValueError, match="event loop must be one of"):
        eventloop.run(coroutine, "trio")  # type: ignore[arg-type]  # what a caller that skipped from_env passes
    assert (
        inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
    )  # never started: no "never awaited" warning


@pytest.mark.parametrize("loop", eventloop.EVENT_LOOPS)
def test_the_kits_mtls_chain_answers_and_refuses_on_each_loop(
    loop: eventloop.EventLoop, pki_paths: pki.PkiPaths
) -> None:
    """grpc.aio's server and client over mutual TLS, through the kit's whole chain, on the loop `run` makes: a
    call of an allowed workload answered, one of a workload the policy does not allow refused."""
    pki.issue(pki_paths, "desk")

    async def scenario() -> tuple[str, str, grpc.StatusCode | None]:
        async with running_echo(pki_paths) as echo:
            async with echo.channel("ops") as channel:
                reply = await echo.stub(channel).Echo(echo_pb2.EchoRequest(text="over mTLS"), timeout=30)
            async with echo.channel("desk") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await echo.stub(channel).Echo(echo_pb2.EchoRequest(text="not allowed"), timeout=30)
        return eventloop.running(), reply.text, refused.value.code()

    assert eventloop.run(scenario(), loop) == (loop, "over mTLS", grpc.StatusCode.PERMISSION_DENIED)


def _serving_line(log: Path) -> dict[str, object] | None:
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{") and '"event": "serving"' in line:
            parsed: dict[str, object] = json.loads(line)
            return parsed
    return None


@pytest.mark.parametrize("configured", [None, "asyncio"])
async def test_a_service_process_runs_on_the_configured_loop(
    configured: str | None, pki_paths: pki.PkiPaths, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "TRADEGUARD_HOME": str(pki_paths.home),
        "TRADEGUARD_KEYVAULT_PORT": str(free_port()),
    }
    env.pop("TRADEGUARD_EVENT_LOOP", None)
    if configured is not None:
        env["TRADEGUARD_EVENT_LOOP"] = configured
    log = tmp_path / "keyvault.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.keyvault", cwd=ROOT, env=env, stderr=stderr
        )
    try:
        await eventually(
            lambda: _serving_line(log) is not None or process.returncode is not None, within_s=120
        )
        line = _serving_line(log)
        assert line is not None, log.read_text(errors="replace")
        assert line["service"] == "keyvault"
        assert line["event_loop"] == (configured or "uvloop")
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def test_a_service_refuses_an_unknown_loop_with_one_line(pki_paths: pki.PkiPaths) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.keyvault"],
        cwd=ROOT,
        env={**os.environ, "TRADEGUARD_HOME": str(pki_paths.home), "TRADEGUARD_EVENT_LOOP": "trio"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "keyvault: TRADEGUARD_EVENT_LOOP must be one of uvloop, asyncio, got 'trio'"


@pytest.mark.parametrize("configured", ["asyncio", "uvloop"])
def test_run_without_a_loop_uses_the_configured_one(configured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEGUARD_EVENT_LOOP", configured)

    async def which() -> str:
        return eventloop.running()

    assert eventloop.run(which()) == configured
