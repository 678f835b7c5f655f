"""Which workloads may call which auth method: deny by default; a firm's own guards by configuration only."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.auth import policy
from services.auth.service import SERVICE
from services.auth.settings import Settings
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import CommonSettings
from tradeguard.settings import Env, SettingsError

TD = "tradeguard.test"
VERIFY = f"{policy.SERVICE}/VerifySignedRequests"
WATCH = f"{policy.SERVICE}/WatchRevocations"
JWKS = f"{policy.SERVICE}/GetJwks"
CREATE_USER = f"{policy.SERVICE}/CreateUser"


def spiffe(name: str) -> str:
    return f"spiffe://{TD}/svc/{name}"


def settings(tmp_path: Path, **values: str) -> Settings:
    common = CommonSettings(
        ServerConfig(name="auth", port=0, home=tmp_path), f"sqlite:///{tmp_path / 'a.db'}"
    )
    return Settings.read(
        Env("TRADEGUARD_AUTH", {f"TRADEGUARD_AUTH_{k}": v for k, v in values.items()}), common
    )


def test_a_firms_own_guard_is_refused_until_configured(tmp_path: Path) -> None:
    default = MethodPolicy(TD, SERVICE.rules_for(settings(tmp_path)))
    assert default.allows(VERIFY, spiffe("trading"))
    assert not any(default.allows(m, spiffe("desk")) for m in (VERIFY, WATCH, JWKS))
    configured = MethodPolicy(TD, SERVICE.rules_for(settings(tmp_path, GUARD_WORKLOADS="desk, quotes")))
    for method in (VERIFY, WATCH, JWKS):
        assert configured.allows(method, spiffe("desk")) and configured.allows(method, spiffe("quotes"))
        assert configured.allows(method, spiffe("trading"))
    # configuring guards grants nothing else
    assert not configured.allows(CREATE_USER, spiffe("desk"))
    assert configured.allows(CREATE_USER, spiffe("ops"))


@pytest.mark.parametrize("bad", ["Desk", "desk/x", "-desk", "a" * 64])
def test_guard_workloads_must_be_workload_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SettingsError, match="TRADEGUARD_AUTH_GUARD_WORKLOADS"):
        settings(tmp_path, GUARD_WORKLOADS=f"desk,{bad}")
