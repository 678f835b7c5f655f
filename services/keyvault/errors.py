"""The key vault's errors: the kit's plain domain errors (`tradeguard.errors`) plus the vault's reasons.

Every failure to decrypt (altered byte, prefix or associated data, truncation, a version below the minimum, a
version that does not exist, a ciphertext of another key) is the one opaque `DecryptionFailed`: the cause goes to
the log only.
"""

from __future__ import annotations

from tradeguard.errors import (
    AlreadyExists,
    Code,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OpaqueError,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "Code",
    "DecryptionFailed",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OpaqueError",
    "PermissionDenied",
    "Unavailable",
    "VersionTooNew",
    "cas_mismatch",
    "deletion_not_allowed",
    "key_exists",
    "key_not_found",
    "key_type_mismatch",
    "permission_denied",
    "secret_not_found",
    "secret_version_destroyed",
    "unseal_failed",
    "vault_sealed",
    "version_too_new",
]


class DecryptionFailed(OpaqueError):
    """The one answer to every bad ciphertext. `cause` is for the log, never for the caller."""

    code = Code.INVALID_ARGUMENT
    reason = "DECRYPTION_FAILED"
    public_message = "decryption failed"


def vault_sealed() -> Unavailable:
    return Unavailable("the key vault is sealed", reason="VAULT_SEALED")


def unseal_failed() -> InvalidArgument:
    return InvalidArgument.field("passphrase", "does not unseal the vault")


def permission_denied(operation: str, resource: str) -> PermissionDenied:
    return PermissionDenied(
        f"caller may not {operation} {resource}",
        reason="VAULT_PERMISSION_DENIED",
        metadata={"operation": operation, "resource": resource},
    )


def key_not_found(name: str) -> NotFound:
    return NotFound("key not found", reason="KEY_NOT_FOUND", metadata={"key_name": name})


def key_exists(name: str) -> AlreadyExists:
    return AlreadyExists("key already exists", reason="KEY_EXISTS", metadata={"key_name": name})


def key_type_mismatch(name: str, key_type: str, operation: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"a {key_type} key cannot {operation}",
        reason="KEY_TYPE_MISMATCH",
        metadata={"key_name": name, "key_type": key_type, "operation": operation},
    )


def deletion_not_allowed(name: str) -> FailedPrecondition:
    return FailedPrecondition(
        "deletion is not allowed for this key (set deletion_allowed first)",
        reason="DELETION_NOT_ALLOWED",
        metadata={"key_name": name},
    )


def secret_not_found(owner: str, path: str) -> NotFound:
    return NotFound("secret not found", reason="SECRET_NOT_FOUND", metadata={"owner": owner, "path": path})


def secret_version_destroyed(owner: str, path: str, version: int) -> FailedPrecondition:
    return FailedPrecondition(
        "secret version was destroyed",
        reason="SECRET_VERSION_DESTROYED",
        metadata={"owner": owner, "path": path, "version": str(version)},
    )


def cas_mismatch(owner: str, path: str, expected: int, actual: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"secret is at version {actual}, not {expected}",
        reason="SECRET_CAS_MISMATCH",
        metadata={"owner": owner, "path": path, "expected": str(expected), "actual": str(actual)},
    )


class VersionTooNew(FailedPrecondition):
    """min_decryption_version raised to a version some replica may not encrypt under yet: with RetryInfo."""

    def __init__(self, message: str, *, retry_after_us: int, metadata: dict[str, str]) -> None:
        super().__init__(message, reason="VERSION_TOO_NEW", metadata=metadata)
        self.retry_after_us = retry_after_us
        self.retry_after_seconds = max(retry_after_us, 0) / 1e6


def version_too_new(name: str, version: int, retry_after_us: int) -> VersionTooNew:
    seconds = -(-retry_after_us // 1000) / 1000  # rounded up to the millisecond
    return VersionTooNew(
        f"version {version} is too new to retire older versions: other replicas may still encrypt under them "
        f"for up to the key freshness window; retry in {seconds:.3f} s",
        retry_after_us=retry_after_us,
        metadata={
            "key_name": name,
            "version": str(version),
            "retry_after_ms": str(-(-retry_after_us // 1000)),
        },
    )
