"""examples/guarded_service.py runs as documented and refuses what its guard must refuse, its guard verifying callers
at the session's real auth service (which lets the `desk` workload run a guard, as the example says a deployment
must configure)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.support import (
    AuthServices,
    create_api_key,
    create_auth_user,
    free_port,
    log_in,
)
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.guard.client import (
    authenticated_channel,
    bearer_interceptors,
    signing_interceptors,
)
from tradeguard.mesh import pki, tls
from tradeguard.testing import eventually

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "guarded_service.py"


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the service
        return subprocess.Popen([sys.executable, str(EXAMPLE)], env=env, stdout=out, stderr=out)


def _serving(proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, f"the example exited: {log.read_text()}"
    return "desk serving on" in log.read_text()


async def test_the_example_serves_guarded_calls(
    pki_paths: pki.PkiPaths, tmp_path: Path, auth_services: AuthServices
) -> None:
    pki.issue(pki_paths, "desk")
    auth = auth_services  # it lets `desk` run a guard (TRADEGUARD_AUTH_GUARD_WORKLOADS, tests/support.py)
    port = free_port()
    env = dict(
        os.environ,
        TRADEGUARD_HOME=str(pki_paths.home),
        TRADEGUARD_DESK_PORT=str(port),
        TRADEGUARD_DESK_AUTH_TARGET=auth.auth_target,  # JWT issuer and audience: the auth service's defaults
        # the guard's quota stage (on by default) at the session's rate limiter, which lets `desk` check quotas
        TRADEGUARD_DESK_RATELIMIT_TARGET=auth.ratelimit_target,
        # and its audit stage (on by default) at the session's audit service, which lets `desk` record
        TRADEGUARD_DESK_AUDIT_TARGET=auth.audit_target,
    )
    log = tmp_path / "desk.log"
    proc = _start(env, log)
    try:
        await eventually(lambda: _serving(proc, log), 30)
        target, client = f"127.0.0.1:{port}", tls.Workload.of(pki_paths, "trading-client")
        trader = await create_auth_user(auth, "acct-7")
        key = await create_api_key(auth, trader.user_id)
        viewer = await create_auth_user(auth, "acct-3", ("viewer",))  # orders:read
        token = await log_in(auth, viewer, "trading-client")  # bound to the bot's certificate
        signed = authenticated_channel(target, "desk", client, signing_interceptors(key))
        bearer = authenticated_channel(target, "desk", client, bearer_interceptors(token))
        async with (
            signed,
            bearer,
            grpc.aio.secure_channel(
                target,
                tls.channel_credentials(client),
                options=[("grpc.ssl_target_name_override", "desk")],
            ) as anonymous,
        ):
            reply = await echo_pb2_grpc.EchoServiceStub(signed).Echo(
                echo_pb2.EchoRequest(text="quote"), timeout=10
            )
            assert reply.text == "acct-7: quote"
            for _ in range(100):  # accepted once its first answer arrived, moments later
                try:
                    reply = await echo_pb2_grpc.EchoServiceStub(bearer).Echo(
                        echo_pb2.EchoRequest(text="q"), timeout=10
                    )
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    await asyncio.sleep(0.05)
            assert reply.text == "acct-3: q"
            with pytest.raises(grpc.aio.AioRpcError) as denied:  # orders:write needed
                await echo_pb2_grpc.EchoServiceStub(bearer).Collect(
                    iter([echo_pb2.CollectRequest(text="a")]), timeout=10
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo_pb2_grpc.EchoServiceStub(anonymous).Echo(echo_pb2.EchoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0
