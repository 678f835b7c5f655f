"""Roles and permissions (services/auth/rbac.py) over the real stores (SQLite and PostgreSQL): the defaults seeded
on first start, permissions_of, the MFA policy, validation naming the field, a change seen by another replica."""

from __future__ import annotations

import pytest

from services.auth.model import Role
from services.auth.rbac import (
    DEFAULT_ROLES,
    PERMISSIONS,
    Rbac,
    validate_permissions,
    validate_role_names,
)
from services.auth.store import AuthStore
from tests.services.auth.conftest import AuthDatabase
from tradeguard.errors import InvalidArgument
from tradeguard.testing import FakeClock


def fields(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in error.value.violations]


async def test_defaults_are_seeded_on_first_start(auth_store: AuthStore, clock: FakeClock) -> None:
    assert await auth_store.list_roles() == []
    rbac = Rbac(auth_store, clock)
    await rbac.load()
    stored = {role.name: role.permissions for role in await auth_store.list_roles()}
    assert stored == dict(DEFAULT_ROLES)
    assert stored["trader"] == {"orders:read", "orders:write"}
    assert stored["viewer"] == {"orders:read"}
    assert (
        stored["admin"]
        == PERMISSIONS
        == {
            "orders:read",
            "orders:write",
            "withdraw",
            "keys:manage",
            "users:manage",
            "trading:halt",
            "risk:manage",
        }
    )
    assert stored["risk-officer"] == {"orders:read", "trading:halt", "risk:manage"}
    assert [role.name for role in rbac.roles()] == ["admin", "risk-officer", "trader", "viewer"]


async def test_a_later_start_keeps_what_operators_changed(auth_store: AuthStore, clock: FakeClock) -> None:
    await auth_store.put_role(Role("trader", frozenset({"orders:read"})))
    rbac = Rbac(auth_store, clock)
    await rbac.load()
    assert rbac.permissions_of(["trader"]) == {"orders:read"}  # not re-seeded over the operator's choice
    assert not rbac.exists("admin")


async def test_permissions_of_and_mfa_required(auth_store: AuthStore, clock: FakeClock) -> None:
    rbac = Rbac(auth_store, clock)
    await rbac.load()
    assert rbac.permissions_of(["viewer"]) == {"orders:read"}
    assert rbac.permissions_of(["viewer", "trader"]) == {"orders:read", "orders:write"}
    assert rbac.permissions_of([]) == frozenset()
    assert rbac.permissions_of(["no-such-role"]) == frozenset()  # grants nothing
    assert not rbac.mfa_required(["viewer"])
    assert rbac.mfa_required(["trader"])  # orders:write
    assert rbac.mfa_required(["admin"])
    assert rbac.mfa_required(["viewer", "trader"])
    await rbac.set_role("treasurer", ["orders:read", "withdraw"])
    assert rbac.mfa_required(["treasurer"])  # withdraw
    await rbac.set_role("auditor", ["orders:read", "keys:manage"])
    assert not rbac.mfa_required(["auditor"])


async def test_the_mfa_permissions_come_from_configuration(auth_store: AuthStore, clock: FakeClock) -> None:
    rbac = Rbac(auth_store, clock, mfa_permissions=frozenset({"users:manage"}))
    await rbac.load()
    assert not rbac.mfa_required(["trader"])
    assert rbac.mfa_required(["admin"])


async def test_set_role_validates_names_naming_the_field(auth_store: AuthStore, clock: FakeClock) -> None:
    rbac = Rbac(auth_store, clock)
    await rbac.load()
    with pytest.raises(InvalidArgument) as error:
        await rbac.set_role("Trader!", ["orders:read"])
    assert fields(error) == ["role"]
    with pytest.raises(InvalidArgument) as error:
        await rbac.set_role("desk", ["orders:read", "Orders:Write", "orders:", "a:b:c", "x" * 65])
    assert fields(error) == ["permissions[1]", "permissions[2]", "permissions[3]", "permissions[4]"]
    assert not rbac.exists("desk")
    assert "desk" not in {role.name for role in await auth_store.list_roles()}  # nothing written
    role = await rbac.set_role("desk", ["positions:read", "orders:read"])  # a firm's own permission is fine
    assert role == Role("desk", frozenset({"positions:read", "orders:read"}))


async def test_check_roles_names_each_bad_or_unknown_role(auth_store: AuthStore, clock: FakeClock) -> None:
    rbac = Rbac(auth_store, clock)
    await rbac.load()
    assert rbac.check_roles(["trader", "viewer", "trader"]) == ("trader", "viewer")
    with pytest.raises(InvalidArgument) as error:
        rbac.check_roles(["trader", "BAD", "ghost"], "roles")
    assert fields(error) == ["roles[1]", "roles[2]"]
    assert "ghost" in error.value.message


def test_pure_validators() -> None:
    assert validate_role_names(["a", "b-c", "d_e9"]) == ("a", "b-c", "d_e9")
    with pytest.raises(InvalidArgument) as error:
        validate_role_names(["9lives", "", "x" * 33])
    assert fields(error) == ["roles[0]", "roles[1]", "roles[2]"]
    with pytest.raises(InvalidArgument) as error:
        validate_role_names([f"r{i}" for i in range(33)])
    assert fields(error) == ["roles"]
    assert validate_permissions(["withdraw", "orders:read"]) == {"withdraw", "orders:read"}
    with pytest.raises(InvalidArgument) as error:
        validate_permissions(["ok", " orders:read", "orders read"], "scopes")
    assert fields(error) == ["scopes[1]", "scopes[2]"]


async def test_another_replica_sees_a_change_once_its_table_is_stale(
    auth_db: AuthDatabase, clock: FakeClock
) -> None:
    first = Rbac(await auth_db.open(), clock, max_age_us=5_000_000)
    second = Rbac(await auth_db.open(), clock, max_age_us=5_000_000)
    await first.refresh_if_stale()  # first start: seeds
    await second.refresh_if_stale()
    assert second.mfa_required(["trader"])
    await first.set_role("trader", ["orders:read"])
    assert not first.mfa_required(["trader"])  # this replica at once
    await second.refresh_if_stale()
    assert second.mfa_required(["trader"])  # the other one within max_age...
    clock.advance_s(5)
    await second.refresh_if_stale()
    assert not second.mfa_required(["trader"])  # ...then it re-reads
