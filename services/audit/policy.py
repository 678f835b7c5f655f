"""Which workloads may call which audit method (deny by default). The one place to change it.

The mesh's first gate (tradeguard.mesh.authz): the caller's SPIFFE ID must name a workload listed for the method.
- Recording (Append, AppendBatch): the services that record what they do (trading, auth, the key vault, the rate
  limiter, the monitor: its actions with their evidence) plus TRADEGUARD_AUDIT_GUARD_WORKLOADS (a firm's own
  guarded services). Operators do not append: an entry's recorder is the workload that appended it, and nobody
  may write in another's name.
- Reading (GetCheckpoint, ListCheckpoints, GetInclusionProof, GetConsistencyProof, GetEntries, Query, Tail):
  operators (`ops`: `tradeguard audit query|tail|verify|export`) and the monitor. Recorders cannot read the log
  back (the monitor, which both reads and records, excepted): what one service recorded about a user is not
  another's to read.
"""

from __future__ import annotations

from typing import Final

__all__ = ["APPEND_METHODS", "READERS", "READ_METHODS", "RECORDERS", "RULES", "SERVICE", "rules"]

SERVICE: Final = "/tradeguard.audit.v1.AuditService"

RECORDERS: Final = frozenset({"trading", "auth", "keyvault", "ratelimit", "monitor"})
READERS: Final = frozenset({"ops", "monitor"})

APPEND_METHODS: Final = ("Append", "AppendBatch")
READ_METHODS: Final = (
    "GetCheckpoint",
    "ListCheckpoints",
    "GetInclusionProof",
    "GetConsistencyProof",
    "GetEntries",
    "Query",
    "Tail",
)

RULES: Final[dict[str, frozenset[str]]] = {
    **{f"{SERVICE}/{m}": RECORDERS for m in APPEND_METHODS},
    **{f"{SERVICE}/{m}": READERS for m in READ_METHODS},
}


def rules(guard_workloads: frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
    """RULES, with more workloads allowed to record: a firm's own guarded services (their names from the
    settings: TRADEGUARD_AUDIT_GUARD_WORKLOADS)."""
    if not guard_workloads:
        return dict(RULES)
    return {**RULES, **{f"{SERVICE}/{m}": RECORDERS | guard_workloads for m in APPEND_METHODS}}
