"""`tradeguard quota …` against a running rate-limit service (in process, as production starts it, over mutual
TLS), the command line run as a process exactly as an operator runs it: check, get, reset and limits, readable
and as JSON; a refused call is one line and exit status 1; the service's policy applies to `--as`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from tests.services.ratelimit.test_servicer import LIMITS, PLACE, Ratelimit, ratelimit_service, write_limits
from tradeguard.cli import main
from tradeguard.cli.quota_cmd import describe_decision, describe_limits
from tradeguard.mesh import pki
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.testing import FakeClock, eventually

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Cli:
    service: Ratelimit
    env: dict[str, str]

    async def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`tradeguard ARGS…` as a process (the service answers meanwhile: it runs on this loop)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tradeguard.cli.main",
            *args,
            env=self.env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())

    async def ok(self, *args: str) -> str:
        done = await self.run(*args)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        return done.stdout

    async def refused(self, *args: str, code: int = 1) -> str:
        done = await self.run(*args)
        assert done.returncode == code, (done.stdout, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr
        return done.stderr


@pytest.fixture
async def cli(pki_paths: pki.PkiPaths) -> AsyncIterator[Cli]:
    clock = FakeClock(time.time_ns() // 1000)  # today, so that reset times read as from now
    async with ratelimit_service(pki_paths, clock=clock, reload_interval_s=0.01) as service:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
        env |= {
            "PYTHONPATH": str(ROOT),
            "TRADEGUARD_HOME": str(pki_paths.home),
            "TRADEGUARD_RATELIMIT_PORT": str(service.service.port),
        }
        yield Cli(service, env)


async def test_check_get_reset_as_text(cli: Cli) -> None:
    first = await cli.ok("quota", "check", "key:tgk_cli", "--operation", PLACE)
    lines = first.splitlines()
    assert lines[0] == "allowed (tier standard)"
    assert any(line.split()[:5] == ["orders/per-second", "1", "of", "2", "left"] for line in lines), first
    assert any("requests/per-10s" in line and "[shadow: never refuses]" in line for line in lines), first
    assert "units return in" in first

    await cli.ok("quota", "check", "key:tgk_cli", "--operation", PLACE)
    refused = await cli.ok("quota", "check", "key:tgk_cli", "--operation", PLACE)
    assert refused.startswith("refused (tier standard): retry after ")
    assert any("orders/per-second" in line and "[EXCEEDED]" in line for line in refused.splitlines()), refused

    peek = await cli.ok("quota", "get", "key:tgk_cli", "--operation", PLACE)
    assert peek.startswith("would be refused (tier standard)")
    pro = await cli.ok("quota", "get", "user:someone", "--tier", "pro", "--operation", PLACE, "--cost", "3")
    assert pro.startswith("would be allowed (tier pro)") and "100 of 100 left per 1m" in pro  # a peek

    assert (await cli.ok("quota", "reset", "key:tgk_cli")).strip() == "reset key:tgk_cli: 4 counters cleared"
    assert (await cli.ok("quota", "reset", "key:tgk_cli")).strip() == "reset key:tgk_cli: 0 counters cleared"
    assert (await cli.ok("quota", "check", "key:tgk_cli", "--operation", PLACE)).startswith("allowed")


async def test_json_prints_every_field_and_get_consumes_nothing(cli: Cli) -> None:
    for _ in range(2):
        got = json.loads(await cli.ok("quota", "get", "user:json", "--operation", PLACE, "--json"))
        states = {f"{s['group']}/{s['name']}": s for s in got["decision"]["limits"]}
        assert got["decision"]["allowed"] is True and got["decision"]["store_unavailable"] is False
        assert states["orders/per-second"]["remaining"] == "2"  # uint64 in proto JSON: a string
    checked = json.loads(await cli.ok("quota", "check", "user:json", "--json"))  # the default operation
    assert {s["group"] for s in checked["decision"]["limits"]} == {"requests"}
    reset = json.loads(await cli.ok("quota", "reset", "user:json", "--json"))
    assert reset == {"counters_cleared": 2}
    limits = json.loads(await cli.ok("quota", "limits", "--json"))
    assert limits["tiers"] == ["pro", "standard"] and limits["last_error"] == ""


async def test_limits_shows_the_file_and_a_refused_reload(cli: Cli) -> None:
    shown = await cli.ok("quota", "limits")
    assert f"limits file  {cli.service.limits_file}" in shown
    assert "tiers        pro, standard" in shown and "REFUSED" not in shown
    write_limits(cli.service.limits_file, LIMITS.replace("default_tier: standard", "default_tier: gold"))
    await eventually(lambda: "default_tier" in cli.service.servicer.limits.last_error, 30)
    shown = await cli.ok("quota", "limits")
    assert "last reload  REFUSED, the limits above stay in force:" in shown and "default_tier" in shown


async def test_refusals_are_one_line(cli: Cli) -> None:
    bad = await cli.refused("quota", "check", "key:{x}", "--operation", PLACE)
    assert bad.startswith("INVALID_ARGUMENT:") and "check.subject:" in bad and bad.count("\n") == 1
    for args in (
        ("quota", "--as", "monitor", "reset", "user:x"),
        ("quota", "reset", "user:x", "--as", "trading"),
    ):
        denied = await cli.refused(*args)
        assert denied.startswith("PERMISSION_DENIED") and denied.count("\n") == 1
    assert (await cli.ok("quota", "--as", "monitor", "limits")).startswith("limits file")
    unknown = await cli.refused("quota", "limits", "--as", "nobody", code=2)
    assert "no certificate for workload 'nobody'" in unknown
    zero = await cli.refused("quota", "check", "user:x", "--cost", "0", code=2)
    assert "--cost: must be from 1 to" in zero


async def test_an_unreachable_service_says_where_it_looked(cli: Cli, tmp_path: Path) -> None:
    from tests.support import free_port

    cli.env["TRADEGUARD_RATELIMIT_PORT"] = str(free_port())
    done = await cli.run("quota", "limits")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("UNAVAILABLE") and "tradeguard up" in done.stderr


def test_quota_is_a_command_with_its_options_after_or_before_the_action() -> None:
    args = main.parser().parse_args(["quota", "--as", "monitor", "get", "user:x"])
    assert args.identity == "monitor" and args.operation == "default" and args.cost == 1 and args.tier == ""
    args = main.parser().parse_args(["quota", "reset", "key:k", "--target", "h:1"])
    assert args.target == "h:1" and args.identity == "ops"


# --- what is printed, from the answers themselves ------------------------------------------------------------


def _status(**fields: object) -> pb.LimitStatus:
    return pb.LimitStatus(**fields)  # type: ignore[arg-type]


def test_describe_decision_words_every_case() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    reset = timestamp_pb2.Timestamp()
    reset.FromDatetime((now + timedelta(seconds=90)).replace(tzinfo=None))
    decision = pb.QuotaDecision(
        allowed=False,
        tier="pro",
        retry_after=duration_pb2.Duration(seconds=2, nanos=500_000_000),
        limits=[
            _status(
                name="per-day",
                group="orders",
                limit=100,
                window=duration_pb2.Duration(seconds=86_400),
                remaining=0,
                reset_time=reset,
                exceeded=True,
            ),
            _status(
                name="per-10s",
                group="requests",
                limit=3,
                window=duration_pb2.Duration(seconds=10),
                remaining=0,
                exceeded=True,
                shadow=True,
            ),
        ],
    )
    text = describe_decision(decision, now=now)
    assert text.splitlines() == [
        "refused (tier pro): retry after 2.5 s",
        "  orders/per-day    0 of 100 left per 1d, units return in 1.5 min  [EXCEEDED]",
        "  requests/per-10s  0 of 3 left per 10s  [EXCEEDED; shadow: never refuses]",
    ]
    never = describe_decision(pb.QuotaDecision(allowed=False, tier="standard"), peek=True, now=now)
    assert never.splitlines() == [
        "would be refused (tier standard): never (the cost exceeds a limit)",
        "  no limit applies (the operation's groups are unlimited in this tier)",
    ]
    down = describe_decision(pb.QuotaDecision(allowed=True, tier="t\x1b[2J", store_unavailable=True), now=now)
    assert down.splitlines()[0] == "allowed (tier t [2J)"  # a control character from the server is replaced
    assert "did not answer in time" in down


def test_describe_limits() -> None:
    loaded = timestamp_pb2.Timestamp(seconds=1_767_323_045)
    reply = pb.GetLimitsResponse(source="/x/limits.yaml", sha256="ab" * 32, loaded_time=loaded, tiers=["pro"])
    assert describe_limits(reply).splitlines() == [
        "limits file  /x/limits.yaml",
        f"sha256       {'ab' * 32}",
        "loaded       2026-01-02 03:04:05Z",
        "tiers        pro",
    ]
    reply.last_error = "/x/limits.yaml:3: tiers: missing"
    assert describe_limits(reply).splitlines()[-1] == (
        "last reload  REFUSED, the limits above stay in force: /x/limits.yaml:3: tiers: missing"
    )
