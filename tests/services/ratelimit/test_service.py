"""The rate-limit service as the runner starts it: `python -m services.ratelimit`, its settings and limits file from
the environment, both gRPC services (its own and Envoy's RateLimitService) on one mutual-TLS port; refusals to
start as one line (no limits file, a bad one, a bad setting, Redis unreachable); the store's health: Redis frozen
or stopped → NOT_SERVING with fail-closed limits refusing and fail-open limits allowing (nothing hangs), Redis back
on the same port → SERVING and decisions resume; `tradeguard up` installs the packaged limits and points the
guarded services at the rate limiter."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
from argparse import Namespace
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as descriptors_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.ratelimit.limits_file import parse_limits
from tests.services.ratelimit.test_servicer import LIMITS, PLACE, check, limits_by_name, write_limits
from tests.support import (
    PACKAGED_LIMITS,
    RedisServer,
    _service_env,
    _spawn,
    free_port,
    run_module,
    start_redis,
    stop_process,
    wait_healthy,
)
from tradeguard import registry
from tradeguard.cli import main
from tradeguard.cli.up_cmd import Child, Supervisor
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc
from tradeguard.testing import eventually

ROOT = Path(__file__).resolve().parents[3]
PACKAGED = PACKAGED_LIMITS
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALL_S = 60.0  # a decision's deadline: only there so that a hang fails the test instead of stalling it


def python_m(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m services.ratelimit` with `env` as its whole environment (default: this process's)."""
    return run_module("services.ratelimit", *args, env=env)


# --- the command itself --------------------------------------------------------------------------------------


def test_help_prints_usage_and_starts_nothing() -> None:
    done = python_m("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m services.ratelimit")
    assert (
        "tradeguard.ratelimit.v1.RateLimitService" in done.stdout
        and "TRADEGUARD_RATELIMIT_PORT" in done.stdout
    )
    refused = python_m("--limits", "x")
    assert refused.returncode == 2 and "unknown argument '--limits'" in refused.stderr


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("ratelimit: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_it_refuses_to_start_without_a_limits_file(pki_paths: pki.PkiPaths) -> None:
    pki.issue(pki_paths, "ratelimit")
    home = pki_paths.home
    line = _one_line(python_m(env=_service_env(home, TRADEGUARD_RATELIMIT_PORT=str(free_port()))))
    assert f"no limits file at {home.resolve() / 'config' / 'limits.yaml'}" in line
    assert "tradeguard up" in line and "TRADEGUARD_RATELIMIT_LIMITS_FILE" in line


def test_it_refuses_to_start_on_an_invalid_limits_file_naming_line_and_field(pki_paths: pki.PkiPaths) -> None:
    pki.issue(pki_paths, "ratelimit")
    limits = pki_paths.home / "limits.yaml"
    write_limits(limits, LIMITS.replace("limit: 2, window: 1s", "limit: 2, window: 1x"))
    env = _service_env(
        pki_paths.home,
        TRADEGUARD_RATELIMIT_PORT=str(free_port()),
        TRADEGUARD_RATELIMIT_LIMITS_FILE=str(limits),
    )
    line = _one_line(python_m(env=env))
    assert f"{limits}:" in line and "tiers.standard.orders[0].window" in line and "'1x'" in line


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    done = python_m(env=_service_env(tmp_path, TRADEGUARD_RATELIMIT_STORE_TIMEOUT_MS="0"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "TRADEGUARD_RATELIMIT_STORE_TIMEOUT_MS must be an integer between 1 and 5000, got 0" in done.stderr


def test_it_refuses_to_start_when_redis_does_not_answer(tmp_path: Path, pki_paths: pki.PkiPaths) -> None:
    pki.issue(pki_paths, "ratelimit")
    write_limits(pki_paths.home / "config" / "limits.yaml", LIMITS)
    env = _service_env(
        pki_paths.home,
        TRADEGUARD_RATELIMIT_PORT=str(free_port()),
        TRADEGUARD_RATELIMIT_REDIS_URL=f"redis://:pw-not-shown@127.0.0.1:{free_port()}?connect_timeout=1",
    )
    line = _one_line(python_m(env=env))
    assert "127.0.0.1" in line and "pw-not-shown" not in line and "***" in line


# --- the service as a process --------------------------------------------------------------------------------


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    target: str
    paths: pki.PkiPaths
    log: Path

    def channel(self, caller: str = "ops") -> MeshChannel:
        return MeshChannel(self.target, "ratelimit", tls.Workload.of(self.paths, caller))

    async def health(self) -> int:
        """The server's overall health status, or -1 when it does not answer."""
        try:
            async with self.channel() as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)

    async def health_becomes(self, status: int, within_s: float = 60.0) -> None:
        seen: list[int] = []

        async def poll() -> None:
            while not seen or seen[-1] != status:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                seen.append(await self.health())

        try:
            await asyncio.wait_for(poll(), within_s)
        except TimeoutError:
            raise AssertionError(f"health never became {status}: last seen {seen[-5:]}") from None

    async def decide(self, operation: str, subject: str = "user:p") -> pb.QuotaDecision:
        async with self.channel() as channel:
            stub = ratelimit_pb2_grpc.RateLimitServiceStub(channel)
            reply = await stub.CheckQuota(
                pb.CheckQuotaRequest(check=check(subject, operation)), timeout=CALL_S
            )
        return reply.decision


@contextlib.asynccontextmanager
async def service_process(paths: pki.PkiPaths, **own: str) -> AsyncIterator[Process]:
    """`python -m services.ratelimit` under `paths.home` (its limits file: config/limits.yaml there), waited for
    until SERVING; stopped (SIGTERM) on exit."""
    if not paths.cert("ratelimit").exists():
        pki.issue(paths, "ratelimit")
    port = free_port()
    env = _service_env(
        paths.home, TRADEGUARD_RATELIMIT_PORT=str(port), TRADEGUARD_RATELIMIT_GRACE_S="0", **own
    )
    log = paths.home / "ratelimit.log"
    proc = _spawn("services.ratelimit", env, log)
    try:
        target = f"127.0.0.1:{port}"
        await wait_healthy(proc, target, "ratelimit", tls.Workload.of(paths, "ops"), log)
        yield Process(proc, target, paths, log)
    finally:
        stop_process(proc)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


async def test_both_services_on_one_port_with_health_and_reflection(pki_paths: pki.PkiPaths) -> None:
    write_limits(pki_paths.home / "config" / "limits.yaml", LIMITS)
    async with service_process(pki_paths) as service:
        async with service.channel() as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = set()
            async for answer in answers:
                names |= {s.name for s in answer.list_services_response.service}
        assert {
            "tradeguard.ratelimit.v1.RateLimitService",
            "envoy.service.ratelimit.v3.RateLimitService",
        } <= names
        decision = await service.decide(PLACE, "key:tgk_proc")
        assert decision.allowed and limits_by_name(decision)["orders/per-second"].remaining == 1
        entries = [("principal", "u"), ("key", "tgk_proc"), ("tier", "-"), ("method", PLACE)]
        descriptor = descriptors_pb2.RateLimitDescriptor(
            entries=[descriptors_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
        )
        async with service.channel("edge") as channel:
            envoy_answer: Any = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
                rls_pb2.RateLimitRequest(domain="tradeguard", descriptors=[descriptor]), timeout=CALL_S
            )
        assert envoy_answer.overall_code == rls_pb2.RateLimitResponse.OK
        # the same counters: CheckQuota's unit and Envoy's (within one second: 2 per second allows both)
        assert envoy_answer.statuses[0].limit_remaining in (0, 1)
        service.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.proc.wait, 60) == 0


async def test_the_store_s_health_and_fail_modes_as_redis_freezes_stops_and_returns(
    pki_paths: pki.PkiPaths, redis_server: RedisServer
) -> None:
    await eventually(redis_server.answers, within_s=30)
    write_limits(pki_paths.home / "config" / "limits.yaml", LIMITS)
    url = f"redis://127.0.0.1:{redis_server.port}?timeout=1&connect_timeout=1"
    # a store timeout far above a loaded machine's Redis latency, so only the outage decides by the fail modes
    async with service_process(
        pki_paths, TRADEGUARD_RATELIMIT_REDIS_URL=url, TRADEGUARD_RATELIMIT_STORE_TIMEOUT_MS="1000"
    ) as service:
        up = await service.decide("/test.v1.Fail/Closed")
        assert up.allowed and not up.store_unavailable
        assert limits_by_name(up)["closed/per-hour"].remaining == 999

        os.kill(redis_server.process.pid, signal.SIGSTOP)  # frozen: every call waits until the store timeout
        closed, opened = await asyncio.gather(
            service.decide("/test.v1.Fail/Closed"), service.decide("/test.v1.Fail/Open")
        )
        assert not closed.allowed and closed.store_unavailable and closed.retry_after.seconds == 1
        assert opened.allowed and opened.store_unavailable
        await service.health_becomes(NOT_SERVING)
        os.kill(redis_server.process.pid, signal.SIGCONT)
        await service.health_becomes(SERVING)

        redis_server.stop()  # gone: connections refused
        await service.health_becomes(NOT_SERVING)
        closed, opened = await asyncio.gather(
            service.decide("/test.v1.Fail/Closed"), service.decide("/test.v1.Fail/Open")
        )
        assert not closed.allowed and closed.store_unavailable
        assert opened.allowed and opened.store_unavailable
        both = await service.decide("/test.v1.Fail/Both")
        assert not both.allowed  # one fail-closed limit refuses

        again = start_redis(redis_server.log.parent, port=redis_server.port)  # back on the same port
        redis_server.process = again.process  # the fixture stops it
        await eventually(again.answers, within_s=30)
        await service.health_becomes(SERVING)
        decisions: list[pb.QuotaDecision] = []

        async def resumed() -> None:
            while not decisions or decisions[-1].store_unavailable:
                decisions.append(await service.decide("/test.v1.Fail/Closed", "user:after"))

        await asyncio.wait_for(resumed(), 60)
        assert decisions[-1].allowed
        assert (
            limits_by_name(decisions[-1])["closed/per-hour"].remaining == 999
        )  # a fresh Redis: counted anew
        assert "***" not in url and "Traceback" not in service.log.read_text()


async def test_the_embedded_default_runs_the_packaged_limits_that_tradeguard_up_installs(
    pki_paths: pki.PkiPaths,
) -> None:
    supervisor = Supervisor(
        Namespace(
            home=pki_paths.home,
            cert_hours=24.0,
            check_seconds=30.0,
            ready_timeout=60.0,
            stable_seconds=60.0,
            max_fast_crashes=5,
        )
    )
    installed = supervisor.install_limits()
    assert installed == pki_paths.home / "config" / "limits.yaml"
    async with service_process(pki_paths) as service:  # no Redis: counters in process
        decision = await service.decide(PLACE, "key:tgk_default")
        assert decision.allowed and decision.tier == "standard"
        assert limits_by_name(decision)["orders/per-second"].limit == 10
        async with service.channel() as channel:
            limits = await ratelimit_pb2_grpc.RateLimitServiceStub(channel).GetLimits(
                pb.GetLimitsRequest(), timeout=CALL_S
            )
        assert limits.source == str(installed) and list(limits.tiers) == ["institutional", "pro", "standard"]


# --- `tradeguard up` -----------------------------------------------------------------------------------------


def _supervisor(home: Path) -> Supervisor:
    args = Namespace(
        home=home,
        cert_hours=24.0,
        check_seconds=30.0,
        ready_timeout=60.0,
        stable_seconds=60.0,
        max_fast_crashes=5,
    )
    return Supervisor(args, [registry.lookup(name) for name in registry.SUITE])


def test_up_installs_the_packaged_limits_owner_only_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRADEGUARD_RATELIMIT_LIMITS_FILE", raising=False)
    supervisor = _supervisor(tmp_path / "home")
    path = supervisor.install_limits()
    assert path == tmp_path / "home" / "config" / "limits.yaml"
    assert path.read_bytes() == PACKAGED.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    parse_limits(path.read_text(), str(path))  # valid as installed

    path.write_text("version: 1  # the operator's own\n")
    assert supervisor.install_limits() is None
    assert path.read_text() == "version: 1  # the operator's own\n"

    elsewhere = _supervisor(tmp_path / "other")
    monkeypatch.setenv("TRADEGUARD_RATELIMIT_LIMITS_FILE", str(tmp_path / "mine.yaml"))
    assert elsewhere.install_limits() is None  # the operator named a file: nothing installed
    assert not (tmp_path / "other" / "config").exists()


def test_up_starts_the_rate_limiter_before_trading_and_points_guards_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert registry.SUITE.index("auth") < registry.SUITE.index("ratelimit") < registry.SUITE.index("trading")
    for name in list(os.environ):
        if name.startswith("TRADEGUARD_"):
            monkeypatch.delenv(name)
    supervisor = _supervisor(tmp_path / "home")
    for name, port in (("keyvault", 41001), ("auth", 41002), ("ratelimit", 41003), ("trading", 41004)):
        supervisor.children[name] = Child(registry.lookup(name), port, port + 1000)
    trading = supervisor.child_env(supervisor.children["trading"])
    assert trading["TRADEGUARD_TRADING_RATELIMIT_TARGET"] == "127.0.0.1:41003"
    assert trading["TRADEGUARD_TRADING_AUTH_TARGET"] == "127.0.0.1:41002"
    ratelimit = supervisor.child_env(supervisor.children["ratelimit"])
    assert ratelimit["TRADEGUARD_RATELIMIT_PORT"] == "41003"
    assert not any(k.endswith(("_AUTH_TARGET", "_RATELIMIT_TARGET")) for k in ratelimit)
    monkeypatch.setenv("TRADEGUARD_TRADING_RATELIMIT_TARGET", "10.0.0.9:50052")  # an operator's own wins
    assert (
        supervisor.child_env(supervisor.children["trading"])["TRADEGUARD_TRADING_RATELIMIT_TARGET"]
        == "10.0.0.9:50052"
    )


# --- the README's "Rate limits" ------------------------------------------------------------------------------


def readme_block(language: str, nth: int = 0) -> str:
    """The `nth` ```LANGUAGE block of README.md's "Rate limits" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Rate limits\n")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    return str(blocks[nth])


def test_the_readmes_limits_file_is_valid() -> None:
    config = parse_limits(readme_block("yaml"), "README.md")
    assert set(config.tiers) == {"standard", "pro"} and config.default_tier == "standard"
    assert set(config.overrides) == {"key:tgk_0123456789abcdef", "user:usr_0123456789"}


def test_the_readmes_quota_lines_parse() -> None:
    lines = readme_block("sh").replace("\\\n", " ").splitlines()
    commands = [
        line.split("#", 1)[0].split() for line in lines if line.startswith(".venv/bin/tradeguard quota")
    ]
    assert [words[2] for words in commands] == ["limits", "get", "check", "reset"]
    for words in commands:
        argv = [w.strip('"[]').replace("$TG_KEY", "tgk_x").replace("…", "x") for w in words[1:]]
        main.parser().parse_args(argv)  # the optional parts included


@pytest.mark.slow
async def test_the_readmes_grpcurl_lines_work_as_written(pki_paths: pki.PkiPaths) -> None:
    write_limits(pki_paths.home / "config" / "limits.yaml", PACKAGED.read_text())
    async with service_process(pki_paths) as service:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TRADEGUARD_", "TG_"))},
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TRADEGUARD_HOME": str(pki_paths.home),
            "TRADEGUARD_RATELIMIT_PORT": service.target.rsplit(":", 1)[1],
        }
        shell = await asyncio.create_subprocess_exec(
            *("bash", "-euo", "pipefail", "-c", readme_block("sh", 1)),
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(shell.communicate(), 120)
    assert shell.returncode == 0, err.decode()
    text = out.decode()
    assert '"allowed": true' in text and '"tier": "standard"' in text  # GetQuota
    assert f'"source": "{pki_paths.home / "config" / "limits.yaml"}"' in text  # GetLimits
