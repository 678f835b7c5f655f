"""Roles → permissions: the defaults, validation of names, and the table the service reads from its store.

Permissions are "<resource>:<action>" or a single word ("withdraw"): lowercase ASCII letters, digits and "_",
at most 64 characters. The trading service's are `PERMISSIONS`; a firm's own service may declare others, so any
well-formed name may be granted. Role names: a lowercase letter, then lowercase letters, digits, "_" or "-", at
most 32 characters.

Default roles (seeded into an empty store on first start): trader (orders:read, orders:write), viewer
(orders:read), risk-officer (orders:read, trading:halt: the kill switch, risk:manage: risk limits and reference
prices), admin (every permission in `PERMISSIONS`). MFA is required for a user any of whose roles holds
`orders:write` or `withdraw` (`MFA_PERMISSIONS`).

`Rbac` keeps the table in memory: `permissions_of` and `mfa_required` are lookups, no I/O. `set_role` writes
through the store and updates this replica's table; another replica sees the change once it calls `refresh`
(the service refreshes at most every `max_age_us`, 5 s by default, through `refresh_if_stale`). A role a user holds
but the table lacks grants nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from services.auth.model import Role
from services.auth.store import AuthStore
from tradeguard.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_ROLES",
    "MFA_PERMISSIONS",
    "PERMISSIONS",
    "Rbac",
    "validate_permissions",
    "validate_role_name",
    "validate_role_names",
]

PERMISSIONS: Final = frozenset(
    {
        "orders:read",
        "orders:write",
        "withdraw",
        "keys:manage",
        "users:manage",
        "trading:halt",  # engage (and, with a fresh second factor, release) the kill switch
        "risk:manage",  # pre-trade risk limits and reference prices
    }
)
MFA_PERMISSIONS: Final = frozenset({"orders:write", "withdraw"})
DEFAULT_ROLES: Final[Mapping[str, frozenset[str]]] = {
    "trader": frozenset({"orders:read", "orders:write"}),
    "viewer": frozenset({"orders:read"}),
    "risk-officer": frozenset({"orders:read", "trading:halt", "risk:manage"}),
    "admin": PERMISSIONS,
}
MAX_ROLES: Final = 32
MAX_PERMISSIONS: Final = 64

_ROLE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_PERMISSION: Final = re.compile(r"[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*)?")

Clock = Callable[[], int]


def validate_role_name(name: str, field: str = "role") -> str:
    if not _ROLE.fullmatch(name):
        raise InvalidArgument.field(
            field, "must be a lowercase letter then up to 31 lowercase letters, digits, '_' or '-'"
        )
    return name


def _role_violations(names: Iterable[str], field: str) -> tuple[list[str], list[FieldViolation]]:
    seen: list[str] = []
    violations: list[FieldViolation] = []
    for index, name in enumerate(names):
        if not _ROLE.fullmatch(name):
            violations.append(FieldViolation(f"{field}[{index}]", f"{name!r} is not a valid role name"))
        elif name not in seen:
            seen.append(name)
    if len(seen) > MAX_ROLES:
        violations.append(FieldViolation(field, f"at most {MAX_ROLES} roles"))
    return seen, violations


def validate_role_names(names: Iterable[str], field: str = "roles") -> tuple[str, ...]:
    """The distinct well-formed names in order; InvalidArgument naming `field[i]` for each bad one."""
    seen, violations = _role_violations(names, field)
    if violations:
        raise InvalidArgument(violations)
    return tuple(seen)


def validate_permissions(permissions: Iterable[str], field: str = "permissions") -> frozenset[str]:
    """The permissions as a set; InvalidArgument naming `field[i]` for each malformed name."""
    violations: list[FieldViolation] = []
    result: set[str] = set()
    for index, permission in enumerate(permissions):
        if len(permission) > 64 or not _PERMISSION.fullmatch(permission):
            violations.append(
                FieldViolation(f"{field}[{index}]", f"{permission[:64]!r} is not a valid permission name")
            )
        else:
            result.add(permission)
    if len(result) > MAX_PERMISSIONS:
        violations.append(FieldViolation(field, f"at most {MAX_PERMISSIONS} permissions"))
    if violations:
        raise InvalidArgument(violations)
    return frozenset(result)


def _index_order(violation: FieldViolation) -> tuple[int, str]:
    """Violations in the order of the items they name (`roles[2]` after `roles[1]`; the whole list last)."""
    _, bracket, rest = violation.field.partition("[")
    return (int(rest.rstrip("]")) if bracket else 1 << 30, violation.field)


class Rbac:
    """The role table of one replica, loaded from the store (seeded with `DEFAULT_ROLES` when empty)."""

    def __init__(
        self,
        store: AuthStore,
        clock: Clock,
        *,
        mfa_permissions: frozenset[str] = MFA_PERMISSIONS,
        max_age_us: int = 5_000_000,
    ) -> None:
        self._store = store
        self._clock = clock
        self._mfa_permissions = mfa_permissions
        self._max_age_us = max_age_us
        self._roles: dict[str, frozenset[str]] = {}
        self._loaded_us: int | None = None

    async def load(self) -> None:
        """Read the table; on first start (no role stored) write the default roles first."""
        roles = await self._store.list_roles()
        if not roles:
            for name, permissions in DEFAULT_ROLES.items():
                await self._store.put_role(Role(name, permissions))
            roles = await self._store.list_roles()
        self._roles = {role.name: role.permissions for role in roles}
        self._loaded_us = self._clock()

    async def refresh(self) -> None:
        """Re-read the table (roles another replica changed)."""
        roles = await self._store.list_roles()
        self._roles = {role.name: role.permissions for role in roles}
        self._loaded_us = self._clock()

    async def refresh_if_stale(self) -> None:
        if self._loaded_us is None:
            await self.load()
        elif self._clock() - self._loaded_us >= self._max_age_us:
            await self.refresh()

    async def set_role(self, name: str, permissions: Iterable[str]) -> Role:
        """Create or replace a role (names validated: InvalidArgument naming `role` / `permissions[i]`)."""
        name = validate_role_name(name, "role")
        role = Role(name, validate_permissions(permissions, "permissions"))
        await self._store.put_role(role)
        self._roles[name] = role.permissions
        return role

    def roles(self) -> list[Role]:
        """Every role of this replica's table, by name."""
        return [Role(name, self._roles[name]) for name in sorted(self._roles)]

    def exists(self, name: str) -> bool:
        return name in self._roles

    def check_roles(self, names: Iterable[str], field: str = "roles") -> tuple[str, ...]:
        """Well-formed role names that all exist; InvalidArgument naming `field[i]` otherwise."""
        names = list(names)
        seen, violations = _role_violations(names, field)
        unknown = [
            FieldViolation(f"{field}[{index}]", f"no role named {name!r}")
            for index, name in enumerate(names)
            if _ROLE.fullmatch(name) and name not in self._roles
        ]
        if violations or unknown:
            raise InvalidArgument(sorted([*violations, *unknown], key=_index_order))
        return tuple(seen)

    def permissions_of(self, roles: Iterable[str]) -> frozenset[str]:
        """The union of the roles' permissions (unknown roles grant nothing)."""
        granted: set[str] = set()
        for name in roles:
            granted |= self._roles.get(name, frozenset())
        return frozenset(granted)

    def mfa_required(self, roles: Iterable[str]) -> bool:
        """Whether these roles need a second factor: any of them holds a permission of `MFA_PERMISSIONS`."""
        return not self.permissions_of(roles).isdisjoint(self._mfa_permissions)
