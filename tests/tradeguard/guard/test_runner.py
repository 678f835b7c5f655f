"""The kit's runner mounts the guard when a declaration names permissions."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from services.trading.service import SERVICE as TRADING
from services.trading.settings import RiskSettings, Settings
from tradeguard.guard import Guard
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import Declaration, start


@dataclass(frozen=True)
class PlainSettings:
    """The trading service's settings but for the guard's."""

    server: ServerConfig
    database_url: str
    risk: RiskSettings = field(default_factory=RiskSettings)


def _server(paths: pki.PkiPaths) -> ServerConfig:
    return ServerConfig(name="trading", port=0, home=paths.home, grace_s=0.0, drain_s=0.0)


async def test_permissions_mount_the_guard_first_with_its_task_and_closer(pki_paths: pki.PkiPaths) -> None:
    settings = Settings(server=_server(pki_paths), database_url=f"sqlite:///{pki_paths.home / 'trading.db'}")
    running = await start(TRADING, settings)
    try:
        guard = running.assembly.layers[0]
        assert isinstance(guard, Guard) and guard.permissions == dict(TRADING.permissions or {})
        assert (
            guard.for_method("/grpc.health.v1.Health/Check") is None
        )  # the kit's services: mesh policy alone
        # the service's own tasks, then the guard's (its revocation stream and JWKS refresh)
        assert [t.__name__ for t in running.assembly.tasks][-1:] == ["run"]
    finally:
        await running.stop(grace=0, drain=0)
    unguarded = await start(replace(TRADING, permissions=None), settings)
    try:
        assert list(unguarded.assembly.layers) == []
        assert "run" not in [t.__name__ for t in unguarded.assembly.tasks]
    finally:
        await unguarded.stop(grace=0, drain=0)


async def test_a_declaration_with_permissions_needs_guard_settings(pki_paths: pki.PkiPaths) -> None:
    declaration: Declaration[Any, Any] = TRADING  # started with settings that lack the guard's
    settings = PlainSettings(_server(pki_paths), f"sqlite:///{pki_paths.home / 'trading.db'}")
    with pytest.raises(TypeError, match="guard: GuardSettings"):
        await start(declaration, settings)
