"""Which workloads may call which rate-limit method (deny by default). The one place to change it.

The mesh's first gate (tradeguard.mesh.authz): the caller's SPIFFE ID must name a workload listed for the method.
- Deciding (CheckQuota, CheckQuotaBatch, which consume quota): the services that run a guard's quota stage (the
  reference trading service, plus TRADEGUARD_RATELIMIT_GUARD_WORKLOADS: a firm's own guarded services) and
  operators (`ops`, `tradeguard quota check`).
- Reading (GetQuota, GetLimits): operators and the monitor.
- Resetting a subject (ResetSubject): operators only.
- Envoy's ShouldRateLimit (envoy.service.ratelimit.v3): the HTTP edge only.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ADMIN", "GUARDS", "READERS", "RLS", "RULES", "SERVICE", "rules"]

SERVICE: Final = "/tradeguard.ratelimit.v1.RateLimitService"
RLS: Final = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

ADMIN: Final = frozenset({"ops"})
GUARDS: Final = frozenset({"trading"})
READERS: Final = ADMIN | {"monitor"}

_DECIDING: Final = ("CheckQuota", "CheckQuotaBatch")

RULES: Final[dict[str, frozenset[str]]] = {
    **{f"{SERVICE}/{m}": GUARDS | ADMIN for m in _DECIDING},
    f"{SERVICE}/GetQuota": READERS,
    f"{SERVICE}/GetLimits": READERS,
    f"{SERVICE}/ResetSubject": ADMIN,
    RLS: frozenset({"edge"}),
}


def rules(guard_workloads: frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
    """RULES, with more workloads allowed to decide: a firm's own guarded services (their names from the
    settings: TRADEGUARD_RATELIMIT_GUARD_WORKLOADS)."""
    if not guard_workloads:
        return dict(RULES)
    return {**RULES, **{f"{SERVICE}/{m}": GUARDS | ADMIN | guard_workloads for m in _DECIDING}}
