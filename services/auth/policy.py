"""Which workloads may call which auth method (deny by default). The one place to change it.

The mesh's first gate (tradeguard.mesh.authz): the caller's SPIFFE ID must name a workload listed for the method.
- People's own calls (log in, second factor, tokens, TOTP enrolment, the public keys): the HTTP edge (`edge`),
  operators (`ops`, the CLI) and firms' trading bots (`trading-client`).
- Administration (users, roles, lockout, API keys, revocation): operators only; the monitor may also revoke
  (automatic key revocation and incident response).
- What the guards need (verify signed requests, the revocation stream, the public keys): the services that run
  a guard.
- Envoy's ext_authz Check: the edge only.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ADMIN", "EXT_AUTHZ", "GUARDS", "PEOPLE", "RULES", "SERVICE", "rules"]

SERVICE: Final = "/tradeguard.auth.v1.AuthService"
EXT_AUTHZ: Final = "/envoy.service.auth.v3.Authorization/Check"

PEOPLE: Final = frozenset({"edge", "ops", "trading-client"})
ADMIN: Final = frozenset({"ops"})
GUARDS: Final = frozenset({"trading", "ratelimit", "audit", "monitor"})

_PEOPLES_METHODS: Final = (
    "Login",
    "VerifyMfa",
    "RefreshToken",
    "Logout",
    "BeginTotpEnrollment",
    "ConfirmTotpEnrollment",
)
_ADMIN_METHODS: Final = (
    "CreateUser",
    "GetUser",
    "SetUserRoles",
    "SetRolePermissions",
    "ListRoles",
    "UnlockUser",
    "CreateApiKey",
    "RotateApiKey",
    "ListApiKeys",
)
_REVOKING_METHODS: Final = ("RevokeApiKey", "RevokeTokens")
_GUARD_METHODS: Final = ("VerifySignedRequests", "WatchRevocations")

RULES: Final[dict[str, frozenset[str]]] = {
    **{f"{SERVICE}/{m}": PEOPLE for m in _PEOPLES_METHODS},
    **{f"{SERVICE}/{m}": ADMIN for m in _ADMIN_METHODS},
    **{f"{SERVICE}/{m}": ADMIN | {"monitor"} for m in _REVOKING_METHODS},
    **{f"{SERVICE}/{m}": GUARDS for m in _GUARD_METHODS},
    f"{SERVICE}/GetJwks": PEOPLE | GUARDS,
    EXT_AUTHZ: frozenset({"edge"}),
}


def rules(guard_workloads: frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
    """RULES, with more workloads allowed the guards' methods: a firm's own guarded services (their names from
    the settings: TRADEGUARD_AUTH_GUARD_WORKLOADS)."""
    if not guard_workloads:
        return dict(RULES)
    guards = GUARDS | guard_workloads
    extended = {f"{SERVICE}/{m}": guards for m in _GUARD_METHODS}
    extended[f"{SERVICE}/GetJwks"] = PEOPLE | guards
    return {**RULES, **extended}
