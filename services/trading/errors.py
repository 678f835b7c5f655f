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
    "order_not_found",
    "order_not_open",
]

CLIENT_ORDER_ID_REUSED = "CLIENT_ORDER_ID_REUSED"
ORDER_NOT_OPEN = "ORDER_NOT_OPEN"
ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
ACCOUNT_NOT_ALLOWED = "ACCOUNT_NOT_ALLOWED"


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
