"""`tradeguard alerts list|watch|ack|status` as a process, exactly as an operator runs it, against the real
monitor (in process) following the session's real audit service: a burst of refused logins (synthetic, appended as
the `echo` workload) becomes an alert that the command lists, streams, acknowledges and counts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services.monitor.test_service import Monitor, append, start_at_log_end, started, synthetic
from tests.support import AuthServices
from tradeguard.audit.v1 import audit_pb2 as apb
from tradeguard.cli import main
from tradeguard.cli.alerts_cmd import parse_age
from tradeguard.mesh import pki

ROOT = Path(__file__).resolve().parents[3]


def env_for(monitor: Monitor, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env.update(
        PYTHONPATH=str(ROOT), TRADEGUARD_HOME=str(home), TRADEGUARD_MONITOR_PORT=str(monitor.service.port)
    )
    return env


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tradeguard.cli.main", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


def test_the_options_parse_and_ages_are_checked() -> None:
    args = main.parser().parse_args(
        ["alerts", "list", "--severity", "critical", "--since", "24h", "--as", "ops"]
    )
    assert (args.action, args.severity, args.since, args.identity) == ("list", "critical", "24h", "ops")
    args = main.parser().parse_args(["alerts", "ack", "rate_spike-x", "--note", "rotated"])
    assert (args.alert_id, args.note) == ("rate_spike-x", "rotated")
    assert parse_age("30m") == 1800 and parse_age("7d") == 7 * 86400
    for bad in ("", "5", "1w", "-1h"):
        with pytest.raises(ValueError):
            parse_age(bad)
    with pytest.raises(SystemExit):
        main.parser().parse_args(["alerts", "list", "--severity", "loud"])


async def test_list_watch_ack_and_status(pki_paths: pki.PkiPaths, auth_services: AuthServices) -> None:
    await start_at_log_end(pki_paths, auth_services)
    async with started(pki_paths, auth_services) as monitor:
        env = env_for(monitor, pki_paths.home)
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tradeguard.cli.main", "alerts", "watch", "--since", "1h", env=env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            now = time.time_ns() // 1000
            await append(
                auth_services,
                [
                    synthetic(
                        now + i,
                        principal="mallory",
                        action="login",
                        outcome=apb.OUTCOME_DENIED_AUTHENTICATION,
                    )
                    for i in range(5)
                ],
            )
            assert watch.stdout is not None
            line = await asyncio.wait_for(watch.stdout.readline(), 60)
            streamed = json.loads(line)
            assert (streamed["detector"], streamed["subject"]) == ("auth_failures", "mallory")
        finally:
            watch.terminate()
            await watch.wait()
        alert_id = streamed["alert_id"]

        listed = await cli(env, "alerts", "list", "--detector", "auth_failures", "--since", "1h")
        assert listed.returncode == 0, listed.stderr
        assert [a["alert_id"] for a in json.loads(listed.stdout)["alerts"]] == [alert_id]

        acked = await cli(env, "alerts", "ack", alert_id, "--note", "a password spray, blocked at the edge")
        assert acked.returncode == 0, acked.stderr
        alert = json.loads(acked.stdout)["alert"]
        assert alert["state"] == "ALERT_STATE_ACKNOWLEDGED" and alert["acknowledged_by"].endswith("/svc/ops")
        open_ones = await cli(env, "alerts", "list", "--state", "open")
        assert json.loads(open_ones.stdout)["alerts"] == []

        missing = await cli(env, "alerts", "ack", "auth_failures-nope")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

        status = await cli(env, "alerts", "status")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["following"] is True and int(state["position"]) > 0
        counts = {d["name"]: int(d["alerts"]) for d in state["detectors"]}
        assert counts["auth_failures"] == 1
