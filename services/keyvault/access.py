"""Who may do what, and the record of what was done: the checks and the log line every vault operation shares.

`authorize` asks the policy (before existence: a denied caller learns nothing) and refuses with
PERMISSION_DENIED. `record` and `logged` log what an operation did (operation, caller, resource, version,
outcome), never material: no plaintext, key, ciphertext, signature or passphrase ever reaches the log. An
opaque error's cause is logged here too, where it is known.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from structlog.typing import FilteringBoundLogger

from services.keyvault.errors import DecryptionFailed, DomainError, permission_denied
from services.keyvault.policy import Operation, Policy
from tradeguard.observability.annotations import annotate

__all__ = ["SYSTEM", "Access"]

T = TypeVar("T")

SYSTEM = "keyvault"
"""The caller name of the vault's own scheduled work (automatic rotation, encryption counts)."""


class Access:
    def __init__(self, policy: Policy, log: FilteringBoundLogger) -> None:
        self.policy = policy
        self.log = log

    def allows(self, caller: str | None, operation: Operation, resource: str) -> bool:
        return self.policy.allows(caller, operation, resource)

    def authorize(self, caller: str | None, operation: Operation, resource: str) -> None:
        if not self.policy.allows(caller, operation, resource):
            self.record(operation.value, caller, warning=True, resource=resource, outcome="permission_denied")
            raise permission_denied(operation.value, resource)

    def record(self, operation: str, caller: str | None, *, warning: bool = False, **fields: Any) -> None:
        """Log what an operation did (never material): on its RPC's one log line when a caller's RPC is in
        progress (`annotate`), else, and always for the vault's own scheduled work, as a line of its own."""
        event = "keyvault." + operation
        if caller != SYSTEM and annotate(operation=event, **fields):
            return
        (self.log.warning if warning else self.log.info)(event, caller=caller, **fields)

    async def logged(self, operation: str, caller: str | None, resource: str, work: Awaitable[T]) -> T:
        """`work`'s result, its outcome recorded: ok, the reason of a domain error, a decryption failure's cause."""
        try:
            result = await work
        except DecryptionFailed as error:
            self.record(
                operation, caller, warning=True, resource=resource, outcome="failed", cause=error.cause
            )
            raise
        except DomainError as error:
            self.record(operation, caller, resource=resource, outcome=error.reason)
            raise
        self.record(operation, caller, resource=resource, outcome="ok")
        return result
