"""The trading service's errors: the shared domain errors plus the trading reasons.

Everything here is a plain `tradeguard.errors.DomainError`; the kit's `tradeguard.rpc.errors.to_rpc_status` maps
them to the rich error model.
"""

from __future__ import annotations

from tradeguard.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

__all__ = [
    "ACCOUNT_NOT_ALLOWED",
    "CLIENT_ORDER_ID_REUSED",
    "FRESH_MFA_REQUIRED",
    "KILL_SWITCH_ENGAGED",
    "KILL_SWITCH_NOT_ENGAGED",
    "ORDER_NOT_FOUND",
    "ORDER_NOT_OPEN",
    "AlreadyExists",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "account_not_allowed",
    "client_order_id_reused",
    "fresh_mfa_required",
    "kill_switch_engaged",
    "kill_switch_not_engaged",
    "order_not_found",
    "order_not_open",
]

CLIENT_ORDER_ID_REUSED = "CLIENT_ORDER_ID_REUSED"
ORDER_NOT_OPEN = "ORDER_NOT_OPEN"
ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
ACCOUNT_NOT_ALLOWED = "ACCOUNT_NOT_ALLOWED"
KILL_SWITCH_ENGAGED = "KILL_SWITCH_ENGAGED"
KILL_SWITCH_NOT_ENGAGED = "KILL_SWITCH_NOT_ENGAGED"
FRESH_MFA_REQUIRED = "FRESH_MFA_REQUIRED"


def kill_switch_engaged(scope: str, value: str) -> FailedPrecondition:
    """A new order refused by an engaged kill switch; `scope` is its name (GLOBAL, ACCOUNT, API_KEY, SYMBOL).
    The guard records it as OUTCOME_DENIED_RISK with this metadata as the decision."""
    return FailedPrecondition(
        f"a kill switch is engaged ({scope.lower()} scope): no new orders",
        reason=KILL_SWITCH_ENGAGED,
        metadata={"scope": scope, "value": value},
    )


def kill_switch_not_engaged(scope: str, value: str) -> NotFound:
    return NotFound(
        "no kill switch is engaged for that scope",
        reason=KILL_SWITCH_NOT_ENGAGED,
        metadata={"scope": scope, "value": value},
    )


def fresh_mfa_required(max_age_s: int) -> PermissionDenied:
    return PermissionDenied(
        f"releasing a kill switch needs a login with a second factor at most {max_age_s} s ago "
        "(a refreshed token does not count): log in again with your one-time code",
        reason=FRESH_MFA_REQUIRED,
        metadata={"max_age_s": str(max_age_s)},
    )


def account_not_allowed() -> PermissionDenied:
    # Whatever the account or order: nothing of another account is looked up (permission before existence).
    return PermissionDenied("the caller may act only for its own account", reason=ACCOUNT_NOT_ALLOWED)


def client_order_id_reused(client_order_id: str) -> AlreadyExists:
    return AlreadyExists(
        "client_order_id was already used for a different order",
        reason=CLIENT_ORDER_ID_REUSED,
        metadata={"client_order_id": client_order_id},
    )


def order_not_open(order_id: str, status: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"order is {status.lower()}, not open",
        reason=ORDER_NOT_OPEN,
        metadata={"order_id": order_id, "status": status},
    )


def order_not_found(order_id: str) -> NotFound:
    # The same answer whether the order does not exist or belongs to another account.
    return NotFound("order not found", reason=ORDER_NOT_FOUND, metadata={"order_id": order_id})
